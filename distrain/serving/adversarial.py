"""Adversarial validation (`distrain adversarial`): does the holdout (or a new folder) look like the training data?

Every CV image and every other image (the holdout, or the images under a folder) is embedded by one of the study's
own networks (the first fold model of its best column, from the registered ensemble's files: its pooled features
before the classifier), and a LightGBM classifier learns to tell the two apart, cross-validated (5 stratified
folds): its out-of-fold ROC AUC (2 repeats of the folds, averaged) near 0.5 says the other images look like the
training data, near 1 that they do not. The CV images it is surest are training images (the lowest out-of-fold
p(other)) are listed: the most unlike the other set. One-image classification studies only (a pair or dense
study's networks embed otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrain.data.index import read_index
from distrain.ensembles.adversarial import FOLDS, REPEATS, adversarial_auc
from distrain.errors import BadInput
from distrain.serving.predictor import EnsemblePredictor, images_under, shard_inputs

LISTED = 10


def embedding_network(predictor: EnsemblePredictor, column: str) -> tuple[torch.nn.Module, dict]:
    """The first fold model of `column` (and its job entry) with timm's `forward_features` / `forward_head`."""
    for job, (col, model) in zip(predictor.meta["jobs"], predictor.models):
        if col == column:
            if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
                raise BadInput(f"adversarial: {job['model']} has no forward_features / forward_head to embed with")
            return model, job
    raise BadInput(f"adversarial: column {column} is not in the registered ensemble")


@torch.no_grad()
def embed(predictor: EnsemblePredictor, model: torch.nn.Module, job: dict, images: list[Image.Image]) -> np.ndarray:
    """[n, d] pooled features (pre-logits) of `images` by `model`, preprocessed as the job was."""
    transform, rows = predictor.transform_of(job), []
    for start in range(0, len(images), 256):
        x = transform.normalise(predictor.to_batch([(im,) for im in images[start : start + 256]], transform))
        rows.append(model.forward_head(model.forward_features(x), pre_logits=True).flatten(1).float().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def split_images(data_root: Path, split: str) -> tuple[list[str], list[Image.Image]]:
    """Sample ids and images of one split of a packed data set, sorted by id."""
    return shard_inputs(read_index(data_root).urls(split))  # one image per sample: the task was checked


def folder_images(folder: Path) -> tuple[list[str], list[Image.Image]]:
    paths = images_under(folder)
    return [str(p.relative_to(folder)) for p in paths], [Image.open(p) for p in paths]


def run_adversarial(run_dir: Path, data_root: Path, column: str, against: Path | None) -> dict:
    """The adversarial validation of a finished study's CV images against its holdout (or `against`'s images)."""
    predictor = EnsemblePredictor(run_dir / "ensemble" / "model")
    if predictor.task.images_per_sample != 1 or predictor.task.dense:
        raise BadInput(f"adversarial: task {predictor.task.name}: one-image classification studies only")
    model, job = embedding_network(predictor, column)
    train_ids, train_images = split_images(data_root, "cv")
    other_ids, other_images = folder_images(against) if against else split_images(data_root, "test")
    if not other_ids:
        raise BadInput(f"adversarial: {data_root} has no holdout images; give --against DIR")
    train, other = embed(predictor, model, job, train_images), embed(predictor, model, job, other_images)
    auc, spread, p_train = adversarial_auc(train, other)
    order = np.argsort(p_train, kind="stable")[:LISTED]
    unlike = [{"sample_id": train_ids[i], "p_other": float(p_train[i])} for i in order]
    return {"against": str(against) if against else "test", "embedding": job["id"], "auc": auc,
            "auc_fold_std": spread, "n_cv": len(train_ids), "n_other": len(other_ids), "folds": FOLDS,
            "repeats": REPEATS,
            "most_unlike_other": unlike}  # fmt: skip
