"""Training one job: the timm model, optimizer and LR schedule, the typed training state and its
checkpoints, the loop (build, resume, train an epoch, evaluate, finish) and the job's outputs."""
