"""Review plots for the study run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(jobs: list[dict], ensembles: dict, metric: str, path: Path) -> Path:
    """Each job's validation score as a point, each ensemble's CV score as a line across."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    models = sorted({j["model"] for j in jobs})
    for i, m in enumerate(models):
        pts = [(k, j["val_score"]) for k, j in enumerate(jobs) if j["model"] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=m, color=f"C{i}", zorder=3)
    for i, (name, s) in enumerate(ensembles.items()):
        if s.get("cv") is not None:
            ax.axhline(s["cv"], color=f"C{(i + len(models)) % 10}", ls="--", lw=1, label=f"{name} {s['cv']:.4f}")
    ax.set_xticks(range(len(jobs)), [j["id"] for j in jobs], rotation=70, fontsize=7)
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Jobs (points) and ensembles (CV, dashed)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_confusion(labels: np.ndarray, pred: np.ndarray, num_classes: int, title: str, path: Path) -> Path:
    cm = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    for i in range(num_classes):
        for j in range(num_classes):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    cm[i, j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_calibration(labels: np.ndarray, probs: np.ndarray, title: str, path: Path, bins: int = 10) -> Path:
    """Reliability diagram of the top-class probability."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        m = which == b
        if m.any():
            xs.append(conf[m].mean())
            ys.append(correct[m].mean())
            ns.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(xs, ys, "o-")
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(str(n), (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("mean top-class probability")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    return _save(fig, path)
