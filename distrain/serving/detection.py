"""Serving a text-detection study: images of any size in, scored text boxes in their pixels out, as the study's
holdout was scored.

The fold models of the column the aggregation chose (`report.json`: `ensemble_details.fold_vote.column`) each
predict the image fitted into the `data.image_size` canvas; each map (on the stored grid) is post-processed at the
settings tuned on that column's OOF maps (`ensemble/postprocess.json`), and a box is kept where at least k of the
K fold models found it (`fold_vote`: k = ceil(ensemble.vote_fraction x K), "3 of 5"), fused, and scaled back to the
image's pixels. The files are self-contained (`ensemble/model/`: meta.json and the checkpoints), registered in MLflow
as `DetectionPyfunc`; `distrain predict` writes the boxes as the `--detection` annotation format."""

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
from distrain.study.plan import column_key
from distrain.tasks import HeadSettings, get_task
from distrain.tasks.detection.augment import fit_canvas, scaled
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map
from distrain.tasks.detection.task import map_side
from distrain.tasks.detection.voting import vote_boxes
from distrain.training.models import create_model, model_settings

CHANNELS = 3
"""Detection images are decoded as RGB."""


MODEL_FORMAT = "distrain-detection/1"


def write_detection_model(run_dir: Path, cfg: Config, report: Report, dest: Path) -> Path:
    """The files `DetectionPredictor` loads, in `dest`: the voting column's fold checkpoints and meta.json (the
    column, k of K, the IoU, the post-processing tuned on its OOF maps, each job's network and preprocessing)."""
    vote = report.ensemble_details.get("fold_vote") or {}
    column = vote.get("column") or report.ensemble_details["best_single_column"]
    tuned = json.loads((run_dir / "ensemble" / "postprocess.json").read_text())[column]
    jobs = [j for j in report.jobs if column_key(j["model"], j["seed"]) == column]
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
    meta = {"format": MODEL_FORMAT, "task": cfg.task, "column": column, "k": int(vote.get("k", len(jobs))),
            "iou": float(vote.get("iou", cfg.ensemble.box_iou)), "settings": tuned["final"],
            "image_size": cfg.data.image_size, "num_classes": cfg.data.num_classes, "jobs": entries}  # fmt: skip
    atomic_write_json(dest / "meta.json", meta)
    return dest


class DetectionPredictor:
    """The fold models of a text-detection study's voting column, from the files `write_detection_model` wrote."""

    def __init__(self, model_dir: str | Path):
        root = Path(model_dir)
        if not (root / "meta.json").is_file():
            raise BadInput(f"{root}: no detection model (meta.json); the study has not aggregated")
        self.meta = json.loads((root / "meta.json").read_text())
        self.task, self.size = get_task(self.meta["task"]), int(self.meta["image_size"])
        self.settings = PostprocessSettings(**self.meta["settings"])
        self.k, self.iou, self.column = int(self.meta["k"]), float(self.meta["iou"]), self.meta["column"]
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
    def fold_maps(self, image: Image.Image) -> tuple[list[np.ndarray], float]:
        """Each fold model's probability map of `image` (on the stored grid) and the scale from image pixels to it."""
        rgb = np.asarray(image.convert("RGB"))
        canvas, _ = fit_canvas(rgb, self.size)
        x = self.transform.normalise(torch.from_numpy(canvas).permute(2, 0, 1)[None].contiguous())
        side = map_side(self.size)
        maps = [self.task.activate(model(x))[0].reshape(side, side).numpy() for model in self.models]
        return maps, side / max(rgb.shape[:2])

    def detect(self, image: Image.Image) -> TextRegions:
        """The boxes at least k of the fold models found, in the image's pixels."""
        maps, scale = self.fold_maps(image)
        members = [boxes_from_map(m, self.settings) for m in maps]
        return scaled(vote_boxes(members, self.k, self.iou), 1.0 / scale)

    def predict_words(self, images) -> list[list[dict]]:
        """Each image's words ({"points", "score"}): PIL images or uint8 arrays [H, W(, C)] of any size."""
        out = []
        for item in images:
            image = item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item, dtype=np.uint8))
            found = self.detect(image)
            out.append([{"points": np.round(p, 1).tolist(), "score": round(float(s), 4)}
                        for p, s in zip(found.polygons, found.scores)])  # fmt: skip
        return out


PYFUNC = "distrain.serving.pyfunc:DetectionPyfunc"


def register_detection_model(agg, tracker, model_dir: Path, run_id: str) -> dict:
    """Log and register `model_dir` on the MLflow run `run_id` as `ensemble.model_name` (else
    `distrain-<experiment>`); returns report.json's `ensemble_model` entry."""
    from distrain.tracking.base import model_entry

    name = agg.cfg.ensemble.model_name or f"distrain-{agg.cfg.experiment}"
    tags = {"distrain.ensemble": "fold_vote", "test_hmean": str(agg.report.ensembles["fold_vote"]["test"])}
    version = tracker.log_ensemble_model(run_id, model_dir, name, PYFUNC, tags)
    return {**model_entry(name, version), "ensemble": "fold_vote"}


def predict_detection_folder(predictor: DetectionPredictor, folder: Path) -> dict:
    """Every image under `folder` (recursively, sorted) as an entry of the `--detection` annotation format, each word
    a box with its score. Raises BadInput naming a file that is not an image."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as image:
                image.load()
                (words,) = predictor.predict_words([image])
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as e:
            raise BadInput(f"{path}: not an image ({type(e).__name__})") from None
        words = [{**w, "text": "", "ignore": False} for w in words]
        entries.append({"file": str(path.relative_to(folder)), "width": width, "height": height, "words": words})
    return {"images": entries}
