import json

import numpy as np
import pytest

from distrain.study.folds import FoldManifest, FoldManifestMismatch, build_fold_manifest, persist_or_check
from distrain.tasks import get_task


def dataset(n=300, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"s{i:04d}" for i in range(n)]
    labels = rng.integers(0, classes, n)
    return ids, labels


def test_deterministic_and_independent_of_input_order():
    ids, labels = dataset()
    a = build_fold_manifest(ids, labels, 5, fold_seed=3)
    perm = np.random.default_rng(1).permutation(len(ids))
    b = build_fold_manifest([ids[i] for i in perm], labels[perm], 5, fold_seed=3)
    assert a.fold_of_sample == b.fold_of_sample and a.hash == b.hash
    assert build_fold_manifest(ids, labels, 5, fold_seed=4).hash != a.hash


def test_stratified_every_sample_once_and_class_balance():
    ids, labels = dataset(n=500, classes=4)
    m = build_fold_manifest(ids, labels, 5, fold_seed=0)
    assert sorted(m.fold_of_sample) == sorted(ids)
    label_of = dict(zip(ids, labels))
    overall = np.bincount(labels) / len(labels)
    for fold in range(5):
        members = {s for s, f in m.fold_of_sample.items() if f == fold}
        assert abs(len(members) - 100) <= 1
        share = np.bincount([label_of[s] for s in members], minlength=4) / len(members)
        assert np.abs(share - overall).max() < 0.02


def test_grouped_folds_keep_groups_together():
    ids, labels = dataset(n=400)
    groups = [f"patient{i // 8}" for i in range(400)]
    m = build_fold_manifest(ids, labels, 5, fold_seed=0, groups=groups)
    assert m.strategy == "stratified_group"
    fold_of_group = {}
    for sid, g in zip(ids, groups):
        assert fold_of_group.setdefault(g, m.fold_of_sample[sid]) == m.fold_of_sample[sid]


def test_too_few_samples_of_a_class():
    with pytest.raises(ValueError, match="class 1 has 2 samples, fewer than cv.folds=5"):
        build_fold_manifest([f"s{i}" for i in range(12)], [0] * 10 + [1] * 2, 5, fold_seed=0)


def test_persisted_manifest_is_checked(tmp_path):
    ids, labels = dataset()
    path = tmp_path / "folds.json"
    m = build_fold_manifest(ids, labels, 5, fold_seed=0)
    persist_or_check(m, path)
    assert persist_or_check(m, path).hash == m.hash
    with pytest.raises(FoldManifestMismatch, match="different fold manifest"):
        persist_or_check(build_fold_manifest(ids, labels, 4, fold_seed=0), path)
    d = json.loads(path.read_text())
    d["fold_of_sample"]["s0000"] = (d["fold_of_sample"]["s0000"] + 1) % 5
    path.write_text(json.dumps(d))
    with pytest.raises(FoldManifestMismatch, match="stored hash does not match"):
        FoldManifest.from_json(path.read_text())


def test_multilabel_folds_spread_every_labels_positives_and_refuse_a_too_rare_label():
    rng = np.random.default_rng(0)
    n = 500
    rows = (rng.random((n, 4)) < [0.5, 0.3, 0.1, 0.0]).astype(int)
    rows[rng.choice(n, 10, replace=False), 3] = 1  # a rare label: 10 positives, 2 per fold if spread
    ids = [f"s{i:04d}" for i in range(n)]
    task = get_task("multilabel")
    m = build_fold_manifest(ids, task.fold_strata(rows, 5), 5, fold_seed=0)
    fold = np.array([m.fold_of_sample[s] for s in ids])
    for j in range(4):
        per_fold = np.array([rows[fold == k, j].sum() for k in range(5)])
        assert per_fold.max() - per_fold.min() <= max(2, rows[:, j].sum() // 25), (j, per_fold)
    assert [rows[fold == k, 3].sum() for k in range(5)] == [2] * 5
    rows[:, 3] = 0
    rows[:3, 3] = 1
    with pytest.raises(ValueError, match="label 3 has 3 positive samples, fewer than cv.folds=5"):
        task.fold_strata(rows, 5)
