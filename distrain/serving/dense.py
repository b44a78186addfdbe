"""What serving a dense study's jobs shares: their files written self-contained (checkpoints and meta.json with
each job's network and preprocessing), loaded back, and an image run through each network on the canvas it was
evaluated on (`distrain.serving.detection`, `distrain.serving.masks`)."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrain.config import Config
from distrain.data.transforms import ImageTransform, resolve_transform
from distrain.ensembles.report import Report
from distrain.errors import BadInput
from distrain.fsutil import atomic_write_json
from distrain.tasks import HeadSettings, get_task
from distrain.tasks.detection.augment import fit_canvas
from distrain.training.models import create_model, model_settings

CHANNELS = 3
"""Dense images are decoded as RGB."""


def write_jobs_model(run_dir: Path, cfg: Config, jobs: list[dict], dest: Path, meta: dict) -> Path:
    """`dest`/checkpoints (the jobs' best.pt) and `dest`/meta.json (`meta`, the task, the canvas size, the classes
    and each job's network and preprocessing)."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    entries = []
    for job in jobs:
        trained = cfg.for_model(job["model"])
        shutil.copyfile(run_dir / "jobs" / job["id"] / "best.pt", dest / "checkpoints" / f"{job['id']}.pt")
        entries.append({"id": job["id"], "model": job["model"], "checkpoint": f"{job['id']}.pt",
                        "model_args": model_settings(trained.model, job["model"]),
                        "head": asdict(trained.model.head_settings()),
                        "transform": resolve_transform(job["model"], trained.data, CHANNELS).to_dict()})  # fmt: skip
    atomic_write_json(dest / "meta.json", {**meta, "task": cfg.task, "image_size": cfg.data.image_size,
                                           "num_classes": cfg.data.num_classes, "jobs": entries})  # fmt: skip
    return dest


class DenseJobs:
    """A dense model directory's networks, each with its preprocessing, ready to predict."""

    def __init__(self, model_dir: str | Path):
        root = Path(model_dir)
        if not (root / "meta.json").is_file():
            raise BadInput(f"{root}: no model (meta.json); the study has not aggregated")
        self.meta = json.loads((root / "meta.json").read_text())
        self.task, self.size = get_task(self.meta["task"]), int(self.meta["image_size"])
        self.models = [self._load(root, job) for job in self.meta["jobs"]]
        self.transform = ImageTransform.from_dict(self.meta["jobs"][0]["transform"])

    def _load(self, root: Path, job: dict) -> torch.nn.Module:
        make = functools.partial(create_model, job["model"], **job["model_args"])
        head = HeadSettings(tuple(job["head"]["comparison"]), int(job["head"]["neck_channels"]))
        model = self.task.build_model(make, self.meta["num_classes"], CHANNELS, head)
        checkpoint = torch.load(root / "checkpoints" / job["checkpoint"], map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        return model.eval()

    @torch.no_grad()
    def rows(self, image: Image.Image) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Each network's prediction row of `image` fitted into the canvas (as its evaluation was), and the
        image's (width, height)."""
        rgb = np.asarray(image.convert("RGB"))
        canvas, _ = fit_canvas(rgb, self.size)
        x = self.transform.normalise(torch.from_numpy(canvas).permute(2, 0, 1)[None].contiguous())
        return [self.task.activate(model(x))[0].numpy() for model in self.models], (rgb.shape[1], rgb.shape[0])


def as_image(item) -> Image.Image:
    """A PIL image, or a uint8 array [H, W(, C)] as one."""
    return item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item, dtype=np.uint8))


def register_dense_model(cfg: Config, report: Report, tracker, model_dir: Path, run_id: str, python_model: str,
                         ensemble: str) -> dict:  # fmt: skip
    """Log and register `model_dir` (pyfunc class `python_model`) on the MLflow run `run_id` as
    `ensemble.model_name` (else `distrain-<experiment>`); returns report.json's `ensemble_model` entry."""
    from distrain.tracking.base import model_entry

    name = cfg.ensemble.model_name or f"distrain-{cfg.experiment}"
    tags = {"distrain.ensemble": ensemble, f"test_{report.metric}": str(report.ensembles[ensemble]["test"])}
    version = tracker.log_ensemble_model(run_id, model_dir, name, python_model, tags)
    return {**model_entry(name, version), "ensemble": ensemble}
