"""The final ensemble as a model that predicts from images: every included job's best checkpoint,
averaged per (model, seed) column over folds, then the LightGBM meta-learner (or the weighted vote
when stacking is off). `EnsemblePredictor` is plain Python; `DistrainPyfunc` adapts it to MLflow's
pyfunc flavour (`distrain.serving.pyfunc`) so `mlflow.pyfunc.load_model(...).predict(images)` works.

Artifacts directory layout (written by `distrain.serving.artifacts.write_model_artifacts`):
    meta.json          columns, jobs (id, model: a timm name or a factory's `package.module:function`, column,
                       checkpoint file, transform, tta; a factory's job also model_args: create_model's drop_rate,
                       drop_path_rate and factory_args), image_size, channels, num_classes,
                       task, method ("stacking" | "weighted_vote"), weights, classes (names), threshold
                       (the task's decision thresholds tuned on OOF, if it tunes them: one on p(positive), or one
                       per label; null: the task's default rule)
    checkpoints/*.pt   best.pt of each job
    booster_<k>.txt    the K fold LightGBM meta-models, averaged (stacking only; K per meta target of the task)
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from distrain.data.transforms import ImageTransform, TestTimeAugment
from distrain.errors import BadInput
from distrain.tasks import DEFAULT_TASK, HeadSettings, Task, get_task
from distrain.training.models import create_model


def _as_image(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise BadInput(f"expected uint8 images, got {arr.dtype}")
    return Image.fromarray(arr)


class EnsemblePredictor:
    """Images in, class probabilities out."""

    def __init__(self, artifacts_dir: str | Path):
        root = Path(artifacts_dir)
        self.meta = json.loads((root / "meta.json").read_text())
        self.models = []
        for job in self.meta["jobs"]:
            ckpt = torch.load(root / "checkpoints" / job["checkpoint"], map_location="cpu", weights_only=True)
            # a factory's job: its arguments ("model_args"); the factory's module must import here
            make = functools.partial(create_model, job["model"], **job.get("model_args", {}))
            head = HeadSettings(tuple(job.get("comparison", ())), job.get("neck_channels", HeadSettings.neck_channels))
            model = self.task.build_model(make, self.meta["num_classes"], self.meta["channels"], head)
            model.load_state_dict(ckpt["model"])
            self.models.append((job["column"], model.eval()))
        self.boosters = []
        if self.meta["method"] == "stacking":
            from distrain.ensembles.stacking import load_boosters

            self.boosters = load_boosters([(root / name).read_text() for name in self.meta["boosters"]])

    @property
    def task(self) -> Task:
        return get_task(self.meta.get("task", DEFAULT_TASK))  # model files older than tasks: multiclass

    @property
    def classes(self) -> list[str]:
        return self.meta.get("classes") or [str(c) for c in range(self.meta["num_classes"])]

    def transform_of(self, job: dict) -> ImageTransform:
        """The job's preprocessing as training used it (older model files: bilinear, no crop, [-1, 1])."""
        if "transform" in job:
            return ImageTransform.from_dict(job["transform"])
        return ImageTransform(self.meta["image_size"], self.meta["channels"])

    def samples(self, inputs) -> list[tuple[Image.Image, ...]]:
        """Each input sample as its images: PIL images, uint8 arrays [H, W] or [H, W, C] (a list, each its own
        size), or one uint8 array [N, H, W(, C)]; for a pair task, each sample a pair (a, b) of those, or one
        array [N, 2, H, W(, C)]."""
        n = self.task.images_per_sample
        out = []
        for item in inputs:
            parts = (item,) if n == 1 else tuple(item)
            if len(parts) != n:
                raise BadInput(f"task {self.task.name} takes {n} images per sample, got {len(parts)}")
            out.append(tuple(_as_image(part) for part in parts))
        return out

    def to_batch(self, samples: list[tuple[Image.Image, ...]], transform: ImageTransform) -> torch.Tensor:
        """Samples of images of any size -> uint8 [N, C, S, S] (a pair's two stacked on channels: [N, 2C, S, S]) by
        the transform the shards are decoded with, so serving cannot drift from training."""
        return torch.stack([torch.cat([transform.decode(img) for img in sample]) for sample in samples])

    @torch.no_grad()
    def job_probs(self, images, only: Optional[set[str]] = None) -> Iterator[tuple[dict, np.ndarray]]:
        """(meta.json's job entry, [N, C] probabilities) of every network, of the samples `images` holds, each with
        the preprocessing and TTA its job's OOF and test predictions were made with; only the networks of the
        columns in `only`, when given."""
        images = self.samples(images)
        batches: dict[ImageTransform, torch.Tensor] = {}  # one decoded batch per distinct transform
        for job, (column, model) in zip(self.meta["jobs"], self.models):
            if only is not None and column not in only:
                continue
            transform = self.transform_of(job)
            if transform not in batches:
                batches[transform] = transform.normalise(self.to_batch(images, transform))
            x, tta = batches[transform], TestTimeAugment.from_dict(job.get("tta"))
            probs = torch.cat([tta.probs(model, x[i : i + 256], self.task.activate) for i in range(0, len(x), 256)])
            yield job, probs.numpy()

    def column_probs(self, images, only: Optional[set[str]] = None) -> np.ndarray:
        """[M, N, C]: each (model, seed) column's fold-averaged probabilities of the samples `images` holds (zeros
        for a column not in `only`, when given: its networks are not run)."""
        columns = self.meta["columns"]
        sums = np.zeros((len(columns), len(self.samples(images)), self.meta["num_classes"]))
        counts = np.zeros(len(columns))
        for job, probs in self.job_probs(images, only):
            sums[columns.index(job["column"])] += probs
            counts[columns.index(job["column"])] += 1
        return (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)

    def predict_proba(self, images) -> np.ndarray:
        if not self.boosters:  # a weighted mean: the networks of columns weighted 0 (best_single's others) idle
            weights = np.asarray(self.meta["weights"])
            weighted = {c for c, w in zip(self.meta["columns"], weights) if w != 0}
            return np.tensordot(weights, self.column_probs(images, weighted), axes=1)
        cols = self.column_probs(images)
        from distrain.ensembles.stacking import predict_stacked, stacking_features

        c = self.meta["num_classes"]
        return predict_stacked(self.boosters, stacking_features(cols), self.task.meta_targets(c), c)

    def only_column(self, column: str) -> EnsemblePredictor:
        """This ensemble's column `column` alone (its fold models averaged): a best single column served."""
        if column not in self.meta["columns"]:
            raise BadInput(f"column {column} is not in the ensemble ({', '.join(self.meta['columns'])})")
        kept = [i for i, (col, _m) in enumerate(self.models) if col == column]
        single = copy.copy(self)
        single.meta = {**self.meta, "columns": [column], "jobs": [self.meta["jobs"][i] for i in kept],
                       "weights": [1.0], "method": "weighted_vote", "ensemble": "best_single"}  # fmt: skip
        single.models, single.boosters = [self.models[i] for i in kept], []
        return single

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The task's decisions of `predict_proba`'s output, at the thresholds tuned on OOF when it has them (class
        indices [N]; label sets: 0/1 rows [N, L])."""
        return self.task.decide(probs, self.meta.get("threshold"))


def predict_folder(
    predictor: EnsemblePredictor, folder: Path, batch_size: int = 64, second: Optional[Path] = None
) -> tuple[list[str], np.ndarray]:
    """Every image under `folder` (recursively, sorted), each of any size: (paths relative to `folder`,
    probabilities [N, num_classes]). For a pair task, `second` is the folder of each pair's second image, matched
    by its path relative to the folder without the extension (`a/x.png` with `b/x.jpg`). Raises BadInput naming a
    file that is not an image or has no partner, or a folder given for the wrong kind of task."""
    pairs = predictor.task.images_per_sample > 1
    if pairs != (second is not None):
        need = "a second folder (--second-images DIR, matched by file name)" if pairs else "one folder of images"
        raise BadInput(f"{folder}: task {predictor.task.name} takes {need}")
    paths = images_under(folder)
    partners = _partners(paths, folder, second) if pairs else {}
    probs = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        samples = [(_open(p), _open(partners[p])) if pairs else _open(p) for p in batch]
        probs.append(predictor.predict_proba(samples))
    return [p.relative_to(folder).as_posix() for p in paths], np.concatenate(probs)


def images_under(folder: Path) -> list[Path]:
    from distrain.data.pack import IMAGE_EXTENSIONS

    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise BadInput(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _partners(paths: list[Path], folder: Path, second: Path) -> dict[Path, Path]:
    """Each image's partner in `second`: the image with its relative path, whatever the extension."""
    by_name = {p.relative_to(second).with_suffix(""): p for p in images_under(second)}
    partners = {}
    for path in paths:
        partner = by_name.get(path.relative_to(folder).with_suffix(""))
        if partner is None:
            raise BadInput(f"{path}: no image of the same name in {second}")
        partners[path] = partner
    return partners


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except Exception as e:
        raise BadInput(f"{path}: not an image PIL can read ({type(e).__name__})") from None


def write_predictions_csv(path: Path, names: list[str], probs: np.ndarray, classes: list[str],
                          predicted: np.ndarray) -> None:  # fmt: skip
    """image, prediction (class name of `predicted`; for 0/1 rows the names of the labels set, space-separated),
    then p_<class> per class; written atomically."""
    import csv
    import io

    from distrain.fsutil import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "prediction", *(f"p_{c}" for c in classes)])
    for name, row, label in zip(names, probs, predicted):
        decided = " ".join(classes[j] for j in np.flatnonzero(label)) if np.ndim(label) else classes[int(label)]
        writer.writerow([name, decided, *(f"{p:.6f}" for p in row)])
    atomic_write_text(path, buf.getvalue())


def predict_shards(predictor: EnsemblePredictor, folder: Path, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
    """Every sample of the `*.tar` shards under `folder` (sorted by sample id): (sample ids, probabilities)."""
    urls = sorted(str(p) for p in folder.rglob("*.tar"))
    if not urls:
        raise BadInput(f"{folder}: no .tar shards")
    ids, samples = shard_inputs(urls)
    probs = [predictor.predict_proba(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    return ids, np.concatenate(probs)


def shard_inputs(urls: list[str]) -> tuple[list[str], list]:
    """Every sample of the shards `urls`, sorted by sample id: (sample ids, inputs as `predict_proba` takes them:
    an image, or a pair's two)."""
    refs = shard_refs(urls)
    return [ref.sample_id for ref in refs], [_shard_sample(ref) for ref in refs]


def shard_refs(urls: list[str]) -> list:
    """Every sample of the shards `urls` as `SampleRef`s, sorted by sample id."""
    from distrain.data.shards import shard_samples

    return sorted((ref for url in urls for ref in shard_samples(url)), key=lambda ref: ref.sample_id)


def shard_chunks(urls: list[str], size: int = 1024) -> Iterator[tuple[list[str], list]]:
    """`shard_inputs` in chunks of `size` samples, read as they are needed (memory: one chunk's images)."""
    refs = shard_refs(urls)
    for start in range(0, len(refs), size):
        chunk = refs[start : start + size]
        yield [ref.sample_id for ref in chunk], [_shard_sample(ref) for ref in chunk]


def _shard_sample(ref):
    """A shard sample as `predict_proba` takes it: an image, or a pair's two."""
    import io

    from distrain.data.shards import read_image

    images = [Image.open(io.BytesIO(read_image(ref, second))) for second in ((False, True) if ref.second else (False,))]
    return tuple(images) if ref.second else images[0]
