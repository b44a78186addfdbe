"""The sweep's search space: every entry checked against the config before any trial starts."""

import pytest

from distrain.config import ConfigError, load_config
from distrain.study.space import apply_values, load_space, suggest


def space(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return load_space(p, load_config(None))


def test_ranges_take_their_keys_types_and_choices_any_value(tmp_path):
    params = space(tmp_path, "optim.lr: {low: 2.5e-4, high: 6.0e-4, log: true}\ntrain.epochs: {low: 2, high: 4}\n"
                             "augment.mixup: {choices: [0.0, 0.2]}\noptim.name: {choices: [adamw, sgd]}\n")  # fmt: skip
    assert [(p.key, p.kind, p.low, p.high, p.log) for p in params[:2]] == [
        ("optim.lr", "float", 2.5e-4, 6.0e-4, True),
        ("train.epochs", "int", 2, 4, False),
    ]
    assert params[2].choices == (0.0, 0.2) and params[3].kind == "categorical"
    import optuna

    trial = optuna.create_study().ask()
    values = suggest(trial, params)
    assert 2.5e-4 <= values["optim.lr"] <= 6.0e-4 and values["train.epochs"] in (2, 3, 4)
    cfg = apply_values(load_config(None), values)
    assert cfg.optim.lr == values["optim.lr"] and cfg.optim.name == values["optim.name"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim.lrr: {low: 0.1, high: 1.0}\n", "space: optim.lrr: unknown config key"),
        ("optim.lr: {low: 0.1, high: 0.01}\n", "space: optim.lr: impossible range: low 0.1 is not below high 0.01"),
        ("optim.lr: {low: 0.0, high: 0.1, log: true}\n", "a log range needs low > 0, got 0.0"),
        ("optim.lr: {low: -1.0, high: 0.1}\n", "space: optim.lr=-1.0: optim.lr: invalid value -1.0"),
        ("train.epochs: {low: 0, high: 4}\n", "space: train.epochs=0: train.epochs: invalid value 0"),
        ("train.epochs: {low: 2.5, high: 4}\n", "space: train.epochs: low and high must be ints"),
        ("optim.name: {low: 1, high: 2}\n", "space: optim.name: a str key takes {choices: [..]}"),
        ("optim.name: {choices: [adamw, nosuch]}\n", "space: optim.name='nosuch': optim.name"),
        ("optim.lr: {lo: 0.1, high: 1.0}\n", "space: optim.lr: expected {low: .., high: .., log: ..}"),
        ("augment.mixup: {choices: []}\n", "space: augment.mixup: choices must be a non-empty list"),
        ("cv.folds: {low: 3, high: 5}\n", "space: cv.folds: not tunable by a sweep"),
        ("data.root: {choices: [a, b]}\n", "space: data.root: not tunable by a sweep"),
        ("[1, 2]\n", "expected a mapping of config keys to ranges"),
    ],
)
def test_bad_space_is_refused_with_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        space(tmp_path, text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml", load_config(None))


def test_shipped_sweep_spaces_fit_their_configs():
    from conftest import REPO

    params = load_space(REPO / "configs" / "sweep" / "finetune.yaml", load_config(REPO / "configs" / "finetune.yaml"))
    assert [(p.key, p.low, p.high, p.log) for p in params] == [
        ("optim.lr", 2.5e-4, 6.0e-4, True),
        ("optim.weight_decay", 5.0e-5, 5.0e-4, True),
    ]
