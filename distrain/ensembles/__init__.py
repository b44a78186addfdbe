"""Combining finished jobs: the OOF store, voting, LightGBM stacking, every ensemble scored side by side,
report.json, review plots and the servable ensemble. Torch-free except `serving`; only this package
imports lightgbm."""
