"""Adding a task is a module and a `register_task` call: the example task (tests/example_task.py, written against
`Task` alone) is checked by the config, trained by the loop and combined by every ensemble, each by its own rule."""

import numpy as np
import pytest
from example_task import ExpectedClass

from distrain.config import EnsembleConfig, load_config
from distrain.data.index import read_index
from distrain.data.pack import write_digits
from distrain.distributed import runtime
from distrain.ensembles.combine import run_ensembles
from distrain.ensembles.store import OOFStore
from distrain.errors import ConfigError
from distrain.study.folds import build_fold_manifest
from distrain.study.plan import Job
from distrain.tasks import TASKS, get_task, register_task


@pytest.fixture
def expected_class():
    task = register_task(ExpectedClass())
    yield task
    TASKS.pop(task.name)


def test_a_registered_task_is_checked_by_the_config(expected_class, tmp_path):
    base = ["task=expected_class", "data.source=shards", f"data.root={tmp_path}", "train.loss=ce"]
    assert load_config(None, [*base, "train.metric=qwk"]).task == "expected_class"
    with pytest.raises(ConfigError, match=r"train.metric: invalid value 'map' \(expected a expected_class metric: "
                       r"\['accuracy', 'qwk', 'log_loss'\]\)"):  # fmt: skip
        load_config(None, [*base, "train.metric=map"])
    with pytest.raises(ConfigError, match="task: invalid value 'nosuch'"):
        load_config(None, ["task=nosuch"])
    with pytest.raises(ValueError, match="already registered"):
        register_task(type("Other", (ExpectedClass,), {})())


def test_the_loop_trains_and_scores_a_registered_task_by_its_own_rule(expected_class, tmp_path, fresh_accelerate_state):
    from distrain.training.loop import fit_job

    index = read_index(write_digits(tmp_path / "digits").root)
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    cfg = load_config(None, ["task=expected_class", "data.source=shards", f"data.root={index.root}",
                             "train.metric=qwk", "train.epochs=1", "model.names=[test_resnet]", "data.image_size=16",
                             "data.num_workers=0", "train.progress=false"])  # fmt: skip
    result = fit_job(
        Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train)
    )
    oof = result.oof
    assert np.allclose(oof.probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.val_score == pytest.approx(expected_class.score("qwk", oof.labels, oof.probs), abs=1e-12)
    assert result.history[0]["val_qwk"] == pytest.approx(result.val_score, abs=1e-12)
    argmax_qwk = get_task("multiclass").score("qwk", oof.labels, oof.probs)
    assert result.val_score != pytest.approx(argmax_qwk, abs=1e-9)  # scored by the task's rule, not the argmax


def test_every_ensemble_combines_a_registered_task_by_its_own_rule(expected_class):
    rng = np.random.default_rng(0)
    n, classes, columns = 600, 5, 4
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(columns, n, classes)) + 2.0 * np.eye(classes)[labels]
    oof = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    jobs = [{"id": f"m{k}-s0-f{f}", "val_score": 0.0} for k in range(columns) for f in range(3)]
    store = OOFStore(sample_ids=[f"s{i}" for i in range(n)], labels=labels, folds=np.arange(n) % 3,
                     columns=[f"m{k}-s0" for k in range(columns)], oof=oof, jobs=jobs)  # fmt: skip
    out = run_ensembles(store, "qwk", EnsembleConfig(stacking=True, selection_rounds=3), task=expected_class)
    assert {"soft_vote", "hard_vote", "weighted_vote", "selection", "k_of_n_vote", "stacking"} <= set(out.scores)
    soft = oof.mean(axis=0)
    assert out.scores["soft_vote"]["cv"] == pytest.approx(expected_class.score("qwk", labels, soft))
    assert (out.oof_predictions["soft_vote"] == np.rint(soft @ np.arange(classes))).all()
    median = np.rint(np.median(np.rint(oof @ np.arange(classes)), axis=0))
    assert (out.oof_predictions["hard_vote"] == median).all()
    assert out.scores["stacking"]["cv"] > out.scores["mean_single"]["cv"] - 0.1  # LightGBM learned something
    assert not out.thresholds  # the task tunes none
