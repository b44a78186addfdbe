"""Serving a text-detection study: images of any size in, scored text boxes in their pixels out, as the study's
holdout was scored.

The fold models of the column the aggregation chose (`report.json`: `ensemble_details.fold_vote.column`) each
predict the image fitted into the `data.image_size` canvas; each map (on the stored grid) is post-processed at the
settings tuned on that column's OOF maps (`ensemble/postprocess.json`), and a box is kept where at least k of the
K fold models found it (`fold_vote`: k = ceil(ensemble.vote_fraction x K), "3 of 5"), fused, and scaled back to the
image's pixels. `distrain predict` writes the boxes as the `--detection` annotation format."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrain.config import Config
from distrain.data.transforms import resolve_transform
from distrain.ensembles.report import Report
from distrain.errors import BadInput
from distrain.study.plan import column_key
from distrain.tasks import get_task
from distrain.tasks.detection.augment import fit_canvas, scaled
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map
from distrain.tasks.detection.task import map_side
from distrain.tasks.detection.voting import vote_boxes
from distrain.training.models import create_model, model_settings


class DetectionPredictor:
    """The fold models of a finished text-detection study, voting."""

    def __init__(self, run_dir: Path, cfg: Config):
        report = Report.read(run_dir)
        if report is None or not (run_dir / "ensemble" / "postprocess.json").is_file():
            raise BadInput(f"{run_dir}: no report.json / ensemble/postprocess.json (the study has not aggregated)")
        vote = report.ensemble_details.get("fold_vote") or {}
        self.column = vote.get("column") or report.ensemble_details["best_single_column"]
        tuned = json.loads((run_dir / "ensemble" / "postprocess.json").read_text())[self.column]
        self.settings = PostprocessSettings(**tuned["final"])
        self.iou = float(vote.get("iou", cfg.ensemble.box_iou))
        jobs = [j for j in report.jobs if column_key(j["model"], j["seed"]) == self.column]
        self.k = int(vote.get("k", len(jobs)))
        self.size, self.task = cfg.data.image_size, get_task(cfg.task)
        self.models = [self._load(run_dir, cfg, job) for job in jobs]
        self.transform = resolve_transform(jobs[0]["model"], cfg.for_model(jobs[0]["model"]).data, 3, self.models[0])

    def _load(self, run_dir: Path, cfg: Config, job: dict) -> torch.nn.Module:
        trained = cfg.for_model(job["model"])
        make = functools.partial(create_model, job["model"], **model_settings(trained.model, job["model"]))
        model = self.task.build_model(make, cfg.data.num_classes, 3, trained.model.head_settings())
        checkpoint = torch.load(run_dir / "jobs" / job["id"] / "best.pt", map_location="cpu", weights_only=True)
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


def predict_detection_folder(predictor: DetectionPredictor, folder: Path) -> dict:
    """Every image under `folder` (recursively, sorted) as an entry of the `--detection` annotation format, each word
    a box with its score. Raises BadInput naming a file that is not an image."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as image:
                image.load()
                found = predictor.detect(image)
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as e:
            raise BadInput(f"{path}: not an image ({type(e).__name__})") from None
        words = [{"points": np.round(p, 1).tolist(), "score": round(float(s), 4), "text": "", "ignore": False}
                 for p, s in zip(found.polygons, found.scores)]  # fmt: skip
        entries.append({"file": str(path.relative_to(folder)), "width": width, "height": height, "words": words})
    return {"images": entries}
