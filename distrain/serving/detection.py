"""Serving a text-detection study: images of any size in, scored text boxes in their pixels out, as the study's
holdout was scored.

The fold models of the column the aggregation chose (`report.json`: `ensemble_details.fold_vote.column`) each
predict the image fitted into the `data.image_size` canvas; each map (on the stored grid) is post-processed at the
settings tuned on that column's OOF maps (`ensemble/postprocess.json`), and a box is kept where at least k of the
K fold models found it (`fold_vote`: k = ceil(ensemble.vote_fraction x K), "3 of 5"), fused, and scaled back to the
image's pixels. The files are self-contained (`ensemble/model/`: meta.json and the checkpoints), registered in MLflow
as `DetectionPyfunc`; `distrain predict` writes the boxes as the `--detection` annotation format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from distrain.config import Config
from distrain.ensembles.report import Report
from distrain.errors import BadInput
from distrain.serving.dense import DenseJobs, as_image, write_jobs_model
from distrain.study.plan import column_key
from distrain.tasks.detection.augment import scaled
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map
from distrain.tasks.detection.task import map_side
from distrain.tasks.detection.voting import vote_boxes

MODEL_FORMAT = "distrain-detection/1"


def write_detection_model(run_dir: Path, cfg: Config, report: Report, dest: Path) -> Path:
    """The files `DetectionPredictor` loads, in `dest`: the voting column's fold checkpoints and meta.json (the
    column, k of K, the IoU, the post-processing tuned on its OOF maps, each job's network and preprocessing)."""
    vote = report.ensemble_details.get("fold_vote") or {}
    column = vote.get("column") or report.ensemble_details["best_single_column"]
    tuned = json.loads((run_dir / "ensemble" / "postprocess.json").read_text())[column]
    jobs = [j for j in report.jobs if column_key(j["model"], j["seed"]) == column]
    meta = {"format": MODEL_FORMAT, "column": column, "k": int(vote.get("k", len(jobs))),
            "iou": float(vote.get("iou", cfg.ensemble.box_iou)), "settings": tuned["final"]}  # fmt: skip
    return write_jobs_model(run_dir, cfg, jobs, dest, meta)


class DetectionPredictor(DenseJobs):
    """The fold models of a text-detection study's voting column, from the files `write_detection_model` wrote."""

    def __init__(self, model_dir: str | Path):
        super().__init__(model_dir)
        self.settings = PostprocessSettings(**self.meta["settings"])
        self.k, self.iou, self.column = int(self.meta["k"]), float(self.meta["iou"]), self.meta["column"]

    def detect(self, image: Image.Image) -> TextRegions:
        """The boxes at least k of the fold models found, in the image's pixels."""
        rows, size = self.rows(image)
        side = map_side(self.size)
        members = [boxes_from_map(row.reshape(side, side), self.settings) for row in rows]
        return scaled(vote_boxes(members, self.k, self.iou), max(size) / side)

    def predict_words(self, images) -> list[list[dict]]:
        """Each image's words ({"points", "score"}): PIL images or uint8 arrays [H, W(, C)] of any size."""
        out = []
        for item in images:
            found = self.detect(as_image(item))
            out.append([{"points": np.round(p, 1).tolist(), "score": round(float(s), 4)}
                        for p, s in zip(found.polygons, found.scores)])  # fmt: skip
        return out


PYFUNC = "distrain.serving.pyfunc:DetectionPyfunc"


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
