import numpy as np
import pytest

from distrain.config import EnsembleConfig
from distrain.ensembles.combine import run_ensembles
from distrain.ensembles.selection import greedy_selection
from distrain.ensembles.stacking import lgbm_params, predict_proba, stack, stacking_features
from distrain.ensembles.store import JobPredictions, OOFStore, build_store, long_table
from distrain.ensembles.voting import fit_vote_weights, k_of_n_vote
from distrain.errors import EnsembleError
from distrain.tasks import get_task

MC, BINARY, ML = get_task("multiclass"), get_task("binary"), get_task("multilabel")


def score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The metric as the study's task scores it (0/1 label rows: the label-set task)."""
    return (ML if labels.ndim == 2 else MC).score(metric, labels, probs)


def naive_stack_score(store: OOFStore, metric: str, *, seed: int = 0, rounds: int = 100) -> float:
    """The mistake stacking must not make: fit the meta-learner on all OOF rows and score it on the same
    rows. Here only to show how far above chance that leaks."""
    import lightgbm as lgb

    x = stacking_features(store.oof)
    booster = lgb.train(
        lgbm_params(store.num_classes, seed, 0.1, 31), lgb.Dataset(x, store.labels), num_boost_round=rounds
    )
    return score(metric, store.labels, predict_proba(booster, x, store.num_classes))


def synthetic_store(n=1000, classes=4, columns=6, folds=5, signal=0.0, seed=0, n_test=200):
    """Random OOF/test probabilities; with signal > 0 each column leans towards the true class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    test_labels = rng.integers(0, classes, n_test)

    def probs(y):
        logits = rng.normal(size=(columns, len(y), classes))
        logits[:, np.arange(len(y)), y] += signal * rng.uniform(0.5, 1.5, size=(columns, 1))
        e = np.exp(logits)
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    return OOFStore(
        sample_ids=[f"s{i:05d}" for i in range(n)],
        labels=labels,
        folds=np.arange(n) % folds,
        columns=[f"m{k}-s{k}" for k in range(columns)],
        oof=probs(labels),
        test_ids=[f"t{i}" for i in range(n_test)],
        test_labels=test_labels,
        test=probs(test_labels),
        jobs=[{"id": f"m{k}-s{k}-f{f}", "val_score": 0.0} for k in range(columns) for f in range(folds)],
    )


def test_leakage_permuted_labels_stacking_stays_at_chance_naive_does_not():
    store = synthetic_store(n=1200, classes=4, signal=0.0)
    store.labels = np.random.default_rng(7).permutation(store.labels)  # labels independent of inputs
    chance = np.bincount(store.labels).max() / len(store.labels)
    cv = run_ensembles(store, "accuracy", EnsembleConfig(stacking=True), task=MC).scores["stacking"]["cv"]
    naive = naive_stack_score(store, "accuracy")
    print(f"chance {chance:.3f}, stacking cv {cv:.3f}, naive {naive:.3f}")
    assert abs(cv - 0.25) < 0.05  # chance level for 4 balanced classes
    assert naive > chance + 0.2  # fitted and scored on the same rows: leaks


def test_ensembles_beat_single_models_when_columns_carry_signal():
    store = synthetic_store(signal=1.2)
    out = run_ensembles(store, "accuracy", EnsembleConfig(), task=MC)
    s = out.scores
    assert s["soft_vote"]["cv"] > s["best_single"]["cv"] + 0.05
    assert s["stacking"]["cv"] > s["mean_single"]["cv"] + 0.05
    assert set(s) == {
        "best_single",
        "mean_single",
        "fold_average",
        "soft_vote",
        "hard_vote",
        "weighted_vote",
        "selection",
        "k_of_n_vote",
        "stacking",
    }
    assert all(v["test"] is not None for v in s.values())
    assert sum(out.weights.values()) == pytest.approx(1.0) and min(out.weights.values()) >= 0


def test_one_trained_fold_skips_what_needs_other_folds_and_warns_nothing():
    """cv.only_folds=[k]: weighted voting and stacking have no other folds' rows to be fitted on. They are
    skipped with the reason, instead of LightGBM failing on an empty training set."""
    import warnings

    store = synthetic_store(n=200, folds=1, columns=3, signal=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Mean of empty slice" from fitting weights on no rows
        out = run_ensembles(store, "accuracy", EnsembleConfig(stacking=True), task=MC)
    assert set(out.skipped) == {"weighted_vote", "selection", "stacking"}
    assert "only fold 0 was trained" in out.skipped["stacking"]
    assert out.stacking is None and "stacking" not in out.scores and "weighted_vote" not in out.scores
    assert out.scores["soft_vote"]["cv"] > out.scores["mean_single"]["cv"] - 0.05  # the rest is still built
    assert list(out.weights.values()) == pytest.approx([1 / 3] * 3)
    two = synthetic_store(n=200, folds=2, columns=3, signal=1.0)
    assert run_ensembles(two, "accuracy", EnsembleConfig(), task=MC).skipped == {}


def test_stacking_is_deterministic():
    store = synthetic_store(signal=1.0)
    a, b = stack(store, EnsembleConfig(), MC), stack(store, EnsembleConfig(), MC)
    np.testing.assert_array_equal(a.oof_probs, b.oof_probs)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)


def test_weights_prefer_the_informative_column():
    store = synthetic_store(columns=3, signal=0.0)
    store.oof[1] = np.eye(4, dtype=np.float32)[store.labels] * 0.9 + 0.025  # column 1 is nearly perfect
    w = fit_vote_weights(store.oof, store.labels, MC)
    assert w[1] > 0.8 and w.sum() == pytest.approx(1.0) and (w >= 0).all()


def test_hard_vote_ties_broken_by_summed_probability():
    probs = np.array([[[0.6, 0.4, 0.0]], [[0.1, 0.9, 0.0]]])  # one vote each for class 0 and 1
    assert MC.hard_vote(probs).tolist() == [1]  # class 1 has the larger summed probability (1.3 vs 0.7)
    probs3 = np.array([[[0.6, 0.4]], [[0.6, 0.4]], [[0.0, 1.0]]])
    assert MC.hard_vote(probs3).tolist() == [0]  # 2 votes beat a higher summed probability


def test_k_of_n_vote_keeps_detections_most_agree_on():
    probs = np.array([[[0.9, 0.2]], [[0.8, 0.7]], [[0.6, 0.9]], [[0.1, 0.6]], [[0.7, 0.1]]])  # 5 fold models
    detected = k_of_n_vote(probs, k=3, threshold=0.5)
    assert detected.tolist() == [[True, True]]  # class 0: 4 of 5; class 1: 3 of 5
    assert k_of_n_vote(probs, k=4, threshold=0.5).tolist() == [[True, False]]


def _job(model, seed, fold, ids, classes=3, test_ids=("t0", "t1")):
    rng = np.random.default_rng(fold)
    p = rng.dirichlet(np.ones(classes), len(ids)).astype(np.float32)
    tp = rng.dirichlet(np.ones(classes), len(test_ids)).astype(np.float32)
    return JobPredictions(
        id=f"{model}-s{seed}-f{fold}",
        model=model,
        seed=seed,
        fold=fold,
        val_score=0.5,
        oof_ids=list(ids),
        oof_probs=p,
        test_ids=list(test_ids),
        test_probs=tp,
        test_labels=np.array([0, 1]),
    )


def test_store_checks_coverage_and_names_the_job():
    fold_of = {f"s{i}": i % 2 for i in range(10)}
    labels = {s: i % 3 for i, s in enumerate(sorted(fold_of))}
    f0, f1 = sorted(s for s in fold_of if fold_of[s] == 0), sorted(s for s in fold_of if fold_of[s] == 1)
    good = [_job("a", 1, 0, f0), _job("a", 1, 1, f1), _job("b", 1, 0, f0)]
    partial = good + [_job("b", 1, 1, f1[:-1])]
    with pytest.raises(EnsembleError, match=r"job b-s1-f1: OOF has 4 of 5 rows of fold 1 \(missing e.g. 's9'\)"):
        build_store(partial, [], fold_of, labels)
    store = build_store(partial, [], fold_of, labels, allow_partial=True)
    assert store.columns == ["a-s1"] and store.left_out[0]["column"] == "b-s1"
    assert len(long_table(store)) == 10 + 2
    with pytest.raises(EnsembleError, match="job b-s1-f1: not finished"):
        build_store(good, [{"id": "b-s1-f1", "model": "b", "seed": 1}], fold_of, labels)
    odd = [_job("a", 1, 0, f0), _job("a", 1, 1, f1, classes=4)]
    with pytest.raises(EnsembleError, match="different class counts: a-s1-f0 has 3, a-s1-f1 has 4"):
        build_store(odd, [], fold_of, labels)


def test_k_of_n_votes_the_same_columns_on_cv_and_test():
    """The voters are the (model, seed) columns on OOF and on test (each column's test prediction its fold
    average): fold models voting on test would be another rule (here k of 15 instead of k of 3) that the CV
    score does not validate."""
    store = synthetic_store(n=300, classes=3, columns=3, folds=5, signal=1.5, seed=4)
    rng = np.random.default_rng(0)
    by_job = rng.dirichlet(np.ones(3), size=(15, len(store.test_ids))).astype(np.float32)
    outcome = run_ensembles(
        store, "accuracy", EnsembleConfig(stacking=False, vote_fraction=0.6), test_by_job=by_job, task=MC
    )
    assert (outcome.vote_k, outcome.vote_n_oof, outcome.vote_n_test) == (2, 3, 3)
    detected = k_of_n_vote(store.test, 2, 0.5)
    by_hand = np.where(
        detected.any(1), np.where(detected, store.test.mean(0), -1).argmax(1), store.test.mean(0).argmax(1)
    )
    assert outcome.scores["k_of_n_vote"]["test"] == pytest.approx(float((by_hand == store.test_labels).mean()))


def biased_binary_store(seed=0):
    """A rare positive class whose probabilities are too low: 0.5 misses positives a lower threshold finds."""
    store = synthetic_store(n=1000, classes=2, columns=3, signal=1.5, seed=seed)
    rng = np.random.default_rng(seed)
    store.labels = (rng.random(1000) < 0.15).astype(int)
    store.test_labels = (rng.random(200) < 0.15).astype(int)
    for probs, labels in ((store.oof, store.labels), (store.test, store.test_labels)):
        p1 = np.clip(0.15 + 0.25 * labels + rng.normal(0, 0.12, (3, len(labels))), 0.01, 0.99)
        probs[:] = np.stack([1 - p1, p1], -1)
    return store


def test_binary_thresholds_are_tuned_on_other_folds_and_beat_one_half():
    store = biased_binary_store()
    out = run_ensembles(store, "f1", EnsembleConfig(stacking=True, selection_rounds=0), task=BINARY)
    t = out.thresholds["soft_vote"]
    print({k: v for k, v in t.items() if k != "fold_thresholds"})
    assert set(out.thresholds) == {"best_single", "soft_vote", "weighted_vote", "stacking"}
    assert t["cv_tuned"] > t["cv_at_0.5"] + 0.1 and t["test_tuned"] > t["test_at_0.5"] + 0.1
    assert t["threshold"] < 0.5
    assert t["cv_at_0.5"] == pytest.approx(out.scores["soft_vote"]["cv"], abs=0.02)
    # fold 2's threshold never saw fold 2's labels: relabelling fold 2 leaves it where it was
    flipped = biased_binary_store()
    held = flipped.folds == 2
    flipped.labels[held] = 1 - flipped.labels[held]
    again = run_ensembles(flipped, "f1", EnsembleConfig(stacking=False, selection_rounds=0), task=BINARY).thresholds[
        "soft_vote"
    ]
    assert again["fold_thresholds"]["2"] == t["fold_thresholds"]["2"]
    assert again["fold_thresholds"]["0"] != t["fold_thresholds"]["0"]


def test_probability_metric_skips_label_only_votes_and_lower_is_better_picks_best_single():
    store = synthetic_store(n=600, classes=3, columns=4, signal=1.0)
    store.oof[2] = np.eye(3)[store.labels] * 0.9 + 0.1 / 3  # column 2 is the sharpest: lowest log loss
    out = run_ensembles(store, "log_loss", EnsembleConfig(stacking=False), task=MC)
    assert {"hard_vote", "k_of_n_vote"} <= set(out.skipped) and "hard_vote" not in out.scores
    assert out.scores["best_single"]["column"] == store.columns[2]
    assert out.scores["best_single"]["fold_columns"] == {str(f): store.columns[2] for f in range(5)}
    assert out.scores["best_single"]["cv"] == pytest.approx(score("log_loss", store.labels, store.oof[2]))


def test_best_single_cv_is_chosen_on_other_folds_so_noise_columns_stay_at_chance():
    """20 columns of noise: the best one by its own CV beats chance by luck alone (the labels that chose it score
    it); chosen per fold on the other folds, the best single stays at chance. Mean excess over 20 data sets."""
    own, nested = [], []
    for seed in range(20):
        store = synthetic_store(n=600, classes=2, columns=20, signal=0.0, seed=seed)
        out = run_ensembles(store, "accuracy", EnsembleConfig(stacking=False, selection_rounds=0), task=MC)
        chance = 0.5  # a noise column's expected accuracy on 2 classes
        own.append(out.base["columns"][out.scores["best_single"]["column"]]["cv"] - chance)
        nested.append(out.scores["best_single"]["cv"] - chance)
    print(f"over chance: best column's own CV {np.mean(own):+.3f}, best single chosen per fold {np.mean(nested):+.3f}")
    assert np.mean(own) > 0.025  # the optimism of picking the best of 20 by the same labels
    assert abs(np.mean(nested)) < 0.015


def multilabel_store(n=900, labels=3, columns=4, folds=3, signal=1.5, seed=0, n_test=300):
    """Sigmoid OOF/test probabilities [M, n, L] of 0/1 label rows; with signal > 0 each column leans towards
    the truth, and column 0 (the sharpest) twice as much. Label 2 is rare (10%)."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.5, 0.3, 0.1])[:labels]
    y, y_test = (rng.random((n, labels)) < prevalence).astype(np.int64), (rng.random((n_test, labels)) < prevalence)

    def probs(y):
        lean = signal * np.array([2.0] + [1.0] * (columns - 1))[:, None, None]
        return (1 / (1 + np.exp(-(rng.normal(size=(columns, *y.shape)) + lean * (2 * y - 1) - 1.0)))).astype(np.float32)

    return OOFStore(sample_ids=[f"s{i:05d}" for i in range(n)], labels=y, folds=np.arange(n) % folds,
                    columns=[f"m{k}-s{k}" for k in range(columns)], oof=probs(y),
                    test_ids=[f"t{i}" for i in range(n_test)], test_labels=y_test.astype(np.int64),
                    test=probs(y_test), jobs=[{"id": f"m{k}-s{k}-f{f}", "val_score": 0.0}
                                              for k in range(columns) for f in range(folds)])  # fmt: skip


def test_multilabel_ensembles_vote_and_stack_per_label_with_thresholds_from_other_folds():
    store = multilabel_store()
    out = run_ensembles(store, "f1_macro", EnsembleConfig(stacking=True, selection_rounds=3), task=ML)
    assert {"soft_vote", "hard_vote", "weighted_vote", "k_of_n_vote", "stacking"} <= set(out.scores)
    assert out.stacking.oof_probs.shape == (900, 3) and len(out.stacking.booster_texts) == 3 * 3
    assert out.scores["weighted_vote"]["cv"] > out.scores["mean_single"]["cv"]
    assert out.weights["m0-s0"] == max(out.weights.values())  # the sharpest column weighs most
    t = out.thresholds["soft_vote"]
    assert len(t["threshold"]) == 3 and t["threshold"][2] < 0.5  # the -1 bias: every label needs a lower one
    assert t["cv_tuned"] > t["cv_at_0.5"] and t["test_tuned"] > t["test_at_0.5"]
    flipped = multilabel_store()
    flipped.labels[flipped.folds == 2] = 1 - flipped.labels[flipped.folds == 2]
    again = run_ensembles(flipped, "f1_macro", EnsembleConfig(stacking=False, selection_rounds=0), task=ML)
    again = again.thresholds["soft_vote"]
    assert again["fold_thresholds"]["2"] == t["fold_thresholds"]["2"]  # fold 2's never saw fold 2's labels
    assert again["fold_thresholds"]["0"] != t["fold_thresholds"]["0"]


def test_multilabel_stacking_with_permuted_labels_stays_at_chance():
    store = multilabel_store(signal=0.0)
    store.labels = np.random.default_rng(7).permutation(store.labels)
    cv = run_ensembles(store, "map", EnsembleConfig(stacking=True, selection_rounds=0), task=ML).scores["stacking"][
        "cv"
    ]
    chance = store.labels.mean(axis=0).mean()  # the AP of an uninformative ranking is the prevalence
    assert abs(cv - chance) < 0.06, (cv, chance)


def test_multilabel_hard_vote_is_a_per_label_majority_with_ties_to_the_mean():
    probs = np.array([[[0.9, 0.2, 0.6]], [[0.8, 0.6, 0.1]], [[0.1, 0.1, 0.7]], [[0.2, 0.7, 0.3]]])  # [4, 1, 3]
    # label 0: 2 of 4 (tie, mean 0.5 -> 1); label 1: 2 of 4 (tie, mean 0.4 -> 0); label 2: 2 of 4 (mean 0.425 -> 0)
    assert ML.hard_vote(probs).tolist() == [[1, 0, 0]]
    assert ML.hard_vote(probs[:3]).tolist() == [[1, 0, 1]]


def test_fast_selection_scores_equal_scikit_learn_ties_included():
    from distrain.ensembles.selection import _Objective

    store = synthetic_store(n=300, classes=4, columns=3, signal=1.0)
    store.oof[1] = 0.25  # a constant column: every row a four-way tie, which argmax gives to class 0
    store.oof[2, :100] = np.eye(4)[store.labels[:100]] * 0.5 + np.eye(4)[(store.labels[:100] + 1) % 4] * 0.5
    for metric in ("accuracy", "log_loss", "f1_macro"):
        objective = _Objective(MC, metric, store.labels, store.oof)
        total = np.asarray(objective.columns[0], dtype=np.float64)  # column 0 chosen once already
        for k in range(3):
            expected = score(metric, store.labels, (store.oof[0] + store.oof[k]) / 2)
            assert objective.score(total, k, 2) == pytest.approx(expected), (metric, k)
        assert objective.score(total * 0, 1, 1) == pytest.approx(score(metric, store.labels, store.oof[1]))


def test_greedy_selection_weights_the_informative_columns_and_is_cross_validated():
    store = synthetic_store(n=1000, classes=4, columns=5, signal=0.0)
    rng = np.random.default_rng(3)
    for k in (1, 3):  # two informative columns among noise
        store.oof[k] = 0.6 * np.eye(4)[store.labels] + 0.4 * rng.dirichlet(np.ones(4), 1000)
        store.test[k] = 0.6 * np.eye(4)[store.test_labels] + 0.4 * rng.dirichlet(np.ones(4), 200)
    out = run_ensembles(store, "log_loss", EnsembleConfig(stacking=False, selection_rounds=10), task=MC)
    weights = out.selection["weights"]
    assert weights["m1-s1"] + weights["m3-s3"] == pytest.approx(1.0) and out.selection["rounds"] == 10
    assert sorted(out.selection["fold_weights"]) == ["0", "1", "2", "3", "4"]
    assert out.scores["selection"]["cv"] < out.scores["soft_vote"]["cv"]  # log loss: lower is better
    assert out.scores["selection"]["test"] < out.scores["soft_vote"]["test"]


def test_pinned_columns_stay_in_every_fold_selection():
    store = synthetic_store(n=600, classes=4, columns=4, signal=1.0)
    store.oof[2] = np.random.default_rng(5).dirichlet(np.ones(4), 600)  # pure noise: never chosen on merit
    free = run_ensembles(store, "accuracy", EnsembleConfig(stacking=False, selection_rounds=4), task=MC).selection
    pinned = run_ensembles(
        store, "accuracy", EnsembleConfig(stacking=False, selection_rounds=4), pinned=("m2-s2",), task=MC
    ).selection
    assert free["weights"]["m2-s2"] == 0 and free["pinned"] == []
    assert pinned["pinned"] == ["m2-s2"] and pinned["weights"]["m2-s2"] >= 1 / 5
    assert all(w[2] >= 1 / 5 for w in pinned["fold_weights"].values())


def test_selection_with_permuted_labels_stays_at_chance():
    store = synthetic_store(n=1200, classes=4, signal=0.0)
    store.labels = np.random.default_rng(7).permutation(store.labels)
    out = run_ensembles(store, "accuracy", EnsembleConfig(stacking=False, selection_rounds=10), task=MC)
    in_sample = greedy_selection(store.oof, store.labels, MC, "accuracy", 10)  # selected and scored on the same rows
    naive = score("accuracy", store.labels, np.tensordot(in_sample, store.oof, axes=1))
    print(f"selection cv {out.scores['selection']['cv']:.3f}, in-sample {naive:.3f}")
    assert abs(out.scores["selection"]["cv"] - 0.25) < 0.04  # chance for 4 balanced classes
    assert naive > out.scores["selection"]["cv"]  # what scoring on the selection's own rows would claim


def test_registered_model_is_the_best_ensemble_by_cv_or_the_one_named():
    from distrain.config import Config, EnsembleConfig, TrainConfig
    from distrain.ensembles.aggregate import column_weights, registered_ensemble

    store = synthetic_store(n=600, classes=3, columns=4, signal=1.0)
    out = run_ensembles(store, "accuracy", EnsembleConfig(stacking=True, selection_rounds=5), task=MC)
    cfg = Config(train=TrainConfig(metric="accuracy"))
    names = ("best_single", "soft_vote", "weighted_vote", "selection", "stacking")
    candidates = {n: out.scores[n]["cv"] for n in names}
    assert registered_ensemble(cfg, out) == max(candidates, key=candidates.get)
    named = Config(ensemble=EnsembleConfig(register="soft_vote"))
    assert registered_ensemble(named, out) == "soft_vote"
    assert column_weights("soft_vote", store.columns, out) == [0.25] * 4
    best = out.scores["best_single"]["column"]
    assert column_weights("best_single", store.columns, out) == [float(c == best) for c in store.columns]
    assert column_weights("selection", store.columns, out) == [out.selection["weights"][c] for c in store.columns]
