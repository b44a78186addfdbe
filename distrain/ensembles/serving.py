"""The final ensemble as a model that predicts from images: every included job's best checkpoint,
averaged per (model, seed) column over folds, then the LightGBM meta-learner (or the weighted vote
when stacking is off). `EnsemblePredictor` is plain Python; `DistrainPyfunc` adapts it to MLflow's
pyfunc flavour (`distrain.tracking.mlflow_model`) so `mlflow.pyfunc.load_model(...).predict(images)` works.

Artifacts directory layout (written by `aggregate.write_model_artifacts`):
    meta.json          columns, jobs (id, column, checkpoint file), image_size, channels, num_classes,
                       method ("stacking" | "weighted_vote"), weights
    checkpoints/*.pt   best.pt of each job
    booster_<k>.txt    the K fold LightGBM meta-models, averaged (stacking only)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrain.data.transforms import prepare_batch, to_uint8_tensor
from distrain.errors import BadInput
from distrain.training.models import create_model


class EnsemblePredictor:
    """Images in, class probabilities out."""

    def __init__(self, artifacts_dir: str | Path):
        root = Path(artifacts_dir)
        self.meta = json.loads((root / "meta.json").read_text())
        self.models = []
        for job in self.meta["jobs"]:
            ckpt = torch.load(root / "checkpoints" / job["checkpoint"], map_location="cpu", weights_only=True)
            model = create_model(job["model"], num_classes=self.meta["num_classes"], in_chans=self.meta["channels"])
            model.load_state_dict(ckpt["model"])
            self.models.append((job["column"], model.eval()))
        self.boosters = []
        if self.meta["method"] == "stacking":
            import lightgbm as lgb

            self.boosters = [lgb.Booster(model_str=(root / name).read_text()) for name in self.meta["boosters"]]

    def to_batch(self, images) -> torch.Tensor:
        """uint8 images [N, H, W] or [N, H, W, C] -> uint8 [N, C, S, S], by the same function the shards are
        decoded with (`data.transforms.to_uint8_tensor`), so serving cannot drift from training."""
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise BadInput(f"expected uint8 images, got {arr.dtype}")
        size, channels = self.meta["image_size"], self.meta["channels"]
        return torch.stack([to_uint8_tensor(Image.fromarray(img), size, channels) for img in arr])

    @torch.no_grad()
    def column_probs(self, images) -> np.ndarray:
        """[M, N, C]: each (model, seed) column's fold-averaged probabilities."""
        x = prepare_batch(self.to_batch(images), augment=False)
        columns = self.meta["columns"]
        sums = np.zeros((len(columns), len(x), self.meta["num_classes"]))
        counts = np.zeros(len(columns))
        for column, model in self.models:
            k = columns.index(column)
            probs = torch.cat([torch.softmax(model(x[i : i + 256]).float(), 1) for i in range(0, len(x), 256)])
            sums[k] += probs.numpy()
            counts[k] += 1
        return (sums / counts[:, None, None]).astype(np.float32)

    def predict_proba(self, images) -> np.ndarray:
        cols = self.column_probs(images)
        if not self.boosters:
            return np.tensordot(np.asarray(self.meta["weights"]), cols, axes=1)
        from distrain.ensembles.stacking import predict_stacked, stacking_features

        return predict_stacked(self.boosters, stacking_features(cols), self.meta["num_classes"])
