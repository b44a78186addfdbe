"""Which unlabelled samples a fold's jobs take, and the pseudo-label file's checks."""

import numpy as np
import pytest

from distrain.config import ConfigError
from distrain.study.pseudo_labels import PseudoLabels, read_pseudo_labels, write_pseudo_labels

PROBS = np.array(
    [
        [[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]],  # fold 0's ensemble
        [[0.5, 0.5], [0.05, 0.95], [0.2, 0.8]],  # fold 1's
    ]
)
VOTES = np.array([[3, 1, 2], [1, 3, 3]])


def labels():
    return PseudoLabels(["u0", "u1", "u2"], PROBS, VOTES, columns=3)


def test_a_fold_takes_the_samples_its_own_ensemble_is_sure_of_with_their_class():
    assert labels().selected(0, 0.9, 0) == {"u0": 0, "u2": 1}
    assert labels().selected(1, 0.9, 0) == {"u1": 1}
    assert labels().selected(0, 0.9, 3) == {"u0": 0}  # and that enough columns decide
    assert labels().selected(1, 0.5, 0) == {"u0": 0, "u1": 1, "u2": 1}  # a tie goes to the first class
    assert labels().selected(0, 1.0, 0) == {}


def test_a_written_file_reads_back_and_a_foreign_one_is_refused(tmp_path):
    path = write_pseudo_labels(tmp_path / "p.npz", labels())
    got = read_pseudo_labels(path, {"u0", "u1", "u2", "other"}, 2, 2)
    assert got.sample_ids == ["u0", "u1", "u2"] and got.columns == 3 and got.fold_votes.tolist() == VOTES.tolist()
    for ids, classes, folds, message in [
        ({"u0", "u1"}, 2, 2, "1 sample(s) are not in data.unlabelled (e.g. u2)"),
        ({"u0", "u1", "u2"}, 3, 2, "expected (2, 3, 3) / (2, 3)"),
        ({"u0", "u1", "u2"}, 2, 5, "expected (5, 3, 2) / (5, 3)"),
    ]:
        with pytest.raises(ConfigError, match="pseudo.labels: ") as e:
            read_pseudo_labels(path, ids, classes, folds)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a pseudo-label file"):
        read_pseudo_labels(tmp_path / "none.npz", {"u0"}, 2, 2)
