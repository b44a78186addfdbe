"""What serving a model costs on this machine: samples per second through `EnsemblePredictor.predict_proba` (the
call the registered pyfunc makes), the networks it runs and their parameters."""

from __future__ import annotations

import time

import torch

from distrain.serving.predictor import EnsemblePredictor


def serving_cost(predictor: EnsemblePredictor, samples: list, batch_size: int = 64) -> dict:
    """Samples/s of `predictor` over `samples` in batches of `batch_size`, after one warm-up batch; the networks
    it runs (a weighted mean's columns weighted 0 are not run) and their parameters."""
    with torch.inference_mode():
        predictor.predict_proba(samples[:batch_size])
        start = time.perf_counter()
        for i in range(0, len(samples), batch_size):
            predictor.predict_proba(samples[i : i + batch_size])
        seconds = time.perf_counter() - start
    weight = dict(zip(predictor.meta["columns"], predictor.meta["weights"]))
    run = [model for column, model in predictor.models if predictor.boosters or weight[column] != 0]
    parameters = sum(p.numel() for model in run for p in model.parameters())
    return {"samples_per_s": len(samples) / seconds, "networks": len(run), "parameters": parameters}
