"""What a study is, independent of how it is trained: the plan of jobs, the fold manifest, job
results and their scores. Torch-free, so reading a run directory stays fast."""
