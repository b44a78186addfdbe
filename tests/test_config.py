import pytest

from distrain.config import (
    ConfigError,
    apply_overrides,
    config_differences,
    load_config,
    parse_override,
)
from distrain.orchestration.growth import growth_differences

from conftest import REPO


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_parses():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.cv.folds >= 2 and cfg.model.names


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epoch: 3\n", "train.epoch: unknown key"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("train:\n  batch_size: abc\n", "train.batch_size: expected int, got 'abc'"),
        ("train:\n  batch_size: 0\n", "train.batch_size: invalid value 0 (expected >= 1)"),
        ("train:\n  batch_size: true\n", "train.batch_size: expected int, got True"),
        ("ensemble:\n  members:\n    pin: [resnet99]\n", "ensemble.members.pin: invalid value 'resnet99'"),
        (
            "ensemble:\n  members:\n    pin: [resnet10t]\n    exclude: [resnet10t-s42]\n",
            "ensemble.members: invalid value ['resnet10t-s42'] (expected no column both pinned and excluded)",
        ),
        ("ensemble:\n  members:\n    exclude: [resnet10t]\n", "ensemble.members.exclude: invalid value"),
        ("cv:\n  folds: 1\n", "cv.folds: invalid value 1 (expected >= 2)"),
        ("cv:\n  seeds: []\n", "cv.seeds: invalid value [] (expected at least one seed)"),
        ("cv:\n  seeds: 42\n", "cv.seeds: expected a list of int, got 42"),
        ("model:\n  names: [resnet_does_not_exist]\n", "model.names: unknown timm model 'resnet_does_not_exist'"),
        ("train:\n  precision: fp8\n", "train.precision: invalid value 'fp8'"),
        ("optim:\n  lr: -1\n", "optim.lr: invalid value -1.0 (expected > 0)"),
        ("train: 5\n", "train: expected a mapping, got 5"),
        ("task: binary\n", "data.num_classes: invalid value 10 (expected 2 for task: binary)"),
        ("task: regression\n", "task: invalid value 'regression' (expected one of ('multiclass', 'binary', 'multil"),
        (
            "task: multilabel\ndata:\n  num_classes: 4\n",
            "task: invalid value 'multilabel' (expected multiclass for data.source: digits)",
        ),
        (
            "task: multilabel\ndata:\n  source: digits_multilabel\n  num_classes: 4\n",
            "train.loss: invalid value 'ce' (expected a multilabel loss: ['focal', 'bce'])",
        ),
        ("train:\n  metric: map\n", "train.metric: invalid value 'map' (expected a multiclass metric"),
        ("train:\n  loss: bce\n", "train.loss: invalid value 'bce' (expected a multiclass loss: ['ce', 'focal'])"),
        (
            "train:\n  metric: average_precision\n",
            "train.metric: invalid value 'average_precision' (expected a multiclass metric",
        ),
        (
            "train:\n  focal_alpha: 0.25\n",
            "train.focal_alpha: invalid value 0.25 (expected 0 unless train.loss is focal on a binary or multilabel",
        ),
        (
            "task: binary\ndata:\n  source: digits_binary\n  num_classes: 2\ntrain:\n  pos_weight: 4\n",
            "train.pos_weight: invalid value 4.0",
        ),
        (
            "data:\n  image_size_schedule: {0: 16, 4: 8, 2: 32}\n",
            "data.image_size_schedule: invalid value {0: 16, 4: 8, 2: 32} (expected strictly increasing epochs)",
        ),
        ("data:\n  image_size_schedule: {1: 32}\n", "(expected a first epoch of 0)"),
        ("data:\n  image_size_schedule: {0: 16, 2: 24}\n", "(expected a last size of data.image_size=32"),
        ("data:\n  image_size_schedule: {0: 16, 20: 32}\n", "(expected epochs below train.epochs=12)"),
        ("data:\n  image_size_schedule: {'0': 32}\n", "data.image_size_schedule: expected a mapping with int keys"),
        (
            "model:\n  overrides:\n    resnet10t:\n      train.loss: bce\n",
            "model.overrides.resnet10t: train.loss: invalid value 'bce'",
        ),
        ("sweep:\n  storage: postgresql://me:s3cret@db/optuna\n", "sweep.storage: the URL holds a password"),
        ("tracking:\n  uri: postgresql+psycopg://me:s3cret@db/mlflow\n", "tracking.uri: the URL holds a password"),
        ("tracking:\n  uri: https://me:s3cret@mlflow.example.com\n", "MLFLOW_TRACKING_PASSWORD"),
        ("sweep:\n  storage: postgresql://me:ab/cd+ef==@db/optuna\n", "sweep.storage: the URL holds a password"),
        ("sweep:\n  storage: postgresql://me@db/optuna?password=s3cret\n", "sweep.storage: the URL holds a"),
        ("pseudo:\n  labels: p.npz\n", "pseudo.labels: invalid value 'p.npz' (expected empty without data.unlabelled)"),
        (
            "data:\n  unlabelled: u\npseudo:\n  labels: p.npz\n  soft: true\naugment:\n  cutmix: 1.0\n",
            "pseudo.soft: invalid value True (expected false with augment.mixup / augment.cutmix",
        ),
        ("pseudo:\n  threshold: 1.5\n", "pseudo.threshold: invalid value 1.5 (expected a probability in [0, 1])"),
        (
            "task: multilabel\ndata:\n  source: digits_multilabel\n  num_classes: 4\n  unlabelled: u\n"
            "train:\n  loss: bce\n  metric: f1_macro\npseudo:\n  labels: p.npz\n",
            "pseudo.labels: invalid value 'p.npz' (expected empty: task multilabel does not decide one class",
        ),
        ("distill:\n  alpha: 1.5\n", "distill.alpha: invalid value 1.5 (expected a weight in [0, 1])"),
        ("distill:\n  temperature: 0\n", "distill.temperature: invalid value 0.0 (expected > 0)"),
        (
            "distill:\n  teacher: t.npz\naugment:\n  mixup: 0.2\n",
            "distill.teacher: invalid value 't.npz' (expected empty with augment.mixup / augment.cutmix",
        ),
        (
            "task: segmentation\ndata:\n  source: synth_shapes\n  num_classes: 4\ntrain:\n  loss: ce_dice\n"
            "  metric: miou\ndistill:\n  teacher: t.npz\n",
            "distill.teacher: invalid value 't.npz' (expected empty: task segmentation predicts maps",
        ),
    ],
)
def test_validation_messages_name_key_and_value(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_urls_without_a_password_are_accepted_and_a_refused_one_is_not_echoed(tmp_path):
    for text in ("sweep:\n  storage: postgresql://me@db:5432/optuna\n", "tracking:\n  uri: http://mlflow:5000\n",
                 "tracking:\n  uri: postgresql://db.example.com:5432/mlflow\n"):  # fmt: skip
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "sweep:\n  storage: postgresql://me:s3cret@db/optuna\n"))
    assert "s3cret" not in str(e.value)


def test_a_run_directory_saved_with_a_password_before_the_check_still_loads(tmp_path, monkeypatch):
    """Its config.yaml is read as it is (`distrain status`, `aggregate`, a worker's check for growth); a tracking
    URI with a password in the environment is refused where it is resolved (report.json would hold it)."""
    from distrain.config import config_from_dict
    from distrain.tracking.base import resolve_tracking_uri

    saved = {"sweep": {"storage": "postgresql://me:s3cret@db/optuna"}}
    assert config_from_dict(saved, check_models=False).sweep.storage.endswith("@db/optuna")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:s3cret@mlflow.example.com")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: the URL holds a password"):
        resolve_tracking_uri("", tmp_path)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"malformed YAML at line 3"):
        load_config(write(tmp_path, "train:\n  epochs: [1,\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads "1e-3" (no dot) as a string; the config accepts it as the float it is.
    assert load_config(write(tmp_path, "optim:\n  lr: 1e-3\n")).optim.lr == pytest.approx(1e-3)


def test_override_parsing():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("cv.seeds=[1, 2]") == (["cv", "seeds"], [1, 2])
    assert parse_override("train.precision=bf16") == (["train", "precision"], "bf16")
    assert parse_override("model.grad_checkpointing=true") == (["model", "grad_checkpointing"], True)
    assert parse_override("tracking.uri=http://h:5000") == (["tracking", "uri"], "http://h:5000")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..epochs=1")


def test_overrides_apply_and_are_validated(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 5\n"), ["train.epochs=2", "cv.seeds=[7]", "optim.lr=0.01"])
    assert (cfg.train.epochs, cfg.cv.seeds, cfg.optim.lr) == (2, [7], 0.01)
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="'train' is not a section"):
        apply_overrides({"train": 3}, ["train.epochs=1"])


def test_config_differences_ignore_volatile_keys():
    a = load_config(None).to_dict()
    b = load_config(None, ["tracking.uri=http://x", "data.num_workers=2", "train.epochs=3"]).to_dict()
    assert config_differences(a, b) == ["train.epochs: 12 -> 3"]


def test_growth_is_new_seeds_backbones_and_their_overrides_only():
    old = load_config(None, ["model.names=[test_resnet]", "cv.seeds=[1]"]).to_dict()

    def diff(*overrides):
        return growth_differences(
            old, load_config(None, ["model.names=[test_resnet]", "cv.seeds=[1]", *overrides]).to_dict()
        )

    assert diff() == ([], [])
    assert diff("cv.seeds=[1,2]") == (["cv.seeds: [1] -> [1, 2]"], [])
    grows, refused = diff("model.names=[test_resnet,test_convnext]", "model.overrides={test_convnext: {optim.lr: 0.1}}")
    assert grows == ["model.names: ['test_resnet'] -> ['test_resnet', 'test_convnext']",
                     "model.overrides.test_convnext.optim.lr: None -> 0.1"] and refused == []  # fmt: skip
    assert diff("cv.seeds=[2]") == ([], ["cv.seeds: [1] -> [2]"])  # a finished seed dropped: not growth
    assert diff("cv.seeds=[1,2]", "cv.fold_seed=7")[1] == ["cv.fold_seed: 0 -> 7"]  # the fold manifest changes
    assert diff("model.overrides={test_resnet: {optim.lr: 0.1}}")[1] == [
        "model.overrides.test_resnet.optim.lr: None -> 0.1"
    ]
    assert diff("cv.seeds=[1,2]", "ensemble.selection_rounds=3") == (["cv.seeds: [1] -> [1, 2]"], [])  # volatile


def test_yaml_12_scalars_precision_no_stays_a_string(tmp_path):
    assert load_config(write(tmp_path, "train:\n  precision: no\n")).train.precision == "no"
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    assert load_config(None, ["model.grad_checkpointing=True"]).model.grad_checkpointing is True
    with pytest.raises(ConfigError, match="model.grad_checkpointing: expected bool, got 'yes'"):
        load_config(None, ["model.grad_checkpointing=yes"])
