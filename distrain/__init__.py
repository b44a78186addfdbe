"""distrain: K-fold x seed x backbone training of timm image models over many GPUs and nodes,
combined into voting and stacking ensembles, with every run in MLflow."""

__version__ = "0.1.0"
