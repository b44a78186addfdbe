"""Serving a segmentation study: images of any size in, class-id masks of their size out, by the ensemble the
aggregation scored best on CV among `best_single` (the best column's fold models) and `mean_of_maps` (every
column's), each column's fold models' maps averaged, then the columns', as the holdout was scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distrain.config import Config
from distrain.ensembles.report import Report
from distrain.errors import BadInput
from distrain.serving.dense import DenseJobs, as_image, write_jobs_model
from distrain.study.plan import column_key
from distrain.tasks.semantic import grid_side

MODEL_FORMAT = "distrain-masks/1"
PYFUNC = "distrain.serving.pyfunc:MaskPyfunc"
SERVED = ("best_single", "mean_of_maps")


def served_ensemble(report: Report) -> str:
    """Of `SERVED`, the ensemble with the best CV score (the first of equals)."""
    return max(SERVED, key=lambda name: (report.ensembles[name]["cv"], -SERVED.index(name)))


def write_mask_model(run_dir: Path, cfg: Config, report: Report, dest: Path) -> Path:
    """The files `MaskPredictor` loads, in `dest`: the served ensemble's jobs and meta.json."""
    name, best = served_ensemble(report), report.ensemble_details["best_single_column"]
    jobs = [j for j in report.jobs if name == "mean_of_maps" or column_key(j["model"], j["seed"]) == best]
    meta = {"format": MODEL_FORMAT, "ensemble": name,
            "columns": [column_key(j["model"], j["seed"]) for j in jobs]}  # fmt: skip
    return write_jobs_model(run_dir, cfg, jobs, dest, meta)


class MaskPredictor(DenseJobs):
    """The served ensemble of a segmentation study, from the files `write_mask_model` wrote."""

    def grid_maps(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """The ensemble's class maps of `image` on the stored grid [C, side, side] (each column's fold models
        averaged, then the columns), and the image's (width, height)."""
        rows, size = self.rows(image)
        columns = self.meta["columns"]
        means = [np.mean([r for r, c in zip(rows, columns) if c == col], axis=0) for col in dict.fromkeys(columns)]
        side = grid_side(self.size, self.meta["num_classes"])
        return np.mean(means, axis=0).reshape(-1, side, side), size

    def mask(self, image: Image.Image) -> np.ndarray:
        """Class ids [H, W] at the image's size: the maps brought back to the canvas, the image's part of it to
        the image's size (bilinear), then the argmax."""
        maps, (width, height) = self.grid_maps(image)
        scale = self.size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = F.interpolate(torch.from_numpy(maps)[None], size=(self.size, self.size), mode="bilinear")
        part = canvas[:, :, :new_h, :new_w]
        return F.interpolate(part, size=(height, width), mode="bilinear")[0].argmax(0).numpy().astype(np.uint8)

    def predict_masks(self, images) -> list[np.ndarray]:
        """Each image's class-id mask (uint8 [H, W]): PIL images or uint8 arrays [H, W(, C)] of any size."""
        return [self.mask(as_image(item)) for item in images]


def predict_mask_folder(predictor: MaskPredictor, folder: Path, out: Path) -> int:
    """Every image under `folder` (recursively, sorted) -> its mask as `out/<relative path>.png`; returns the
    count. Raises BadInput naming a file that is not an image."""
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as image:
                image.load()
                mask = predictor.mask(image)
        except (OSError, Image.DecompressionBombError) as e:
            raise BadInput(f"{path}: not an image ({type(e).__name__})") from None
        target = (out / path.relative_to(folder)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(target)
        count += 1
    return count
