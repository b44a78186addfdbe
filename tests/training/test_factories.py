"""`model.names` entries that are the user's own factories (`package.module:function`, here tests/factories.py and
the shipped examples/smallnet.py): built with the model's settings and `model.factory_args`, loaded from a
pretrained file, preprocessed, checkpointed and checked before any work, and refused in one line when they
do not import or do not build a module."""

import pytest
import torch
from safetensors.torch import save_file

from distrain.config import DataConfig, load_config
from distrain.data.transforms import resolve_transform
from distrain.errors import ConfigError
from distrain.training.models import check_grad_checkpointing, check_inputs, create_model


def test_the_factory_is_called_with_the_model_settings_and_its_factory_args():
    model = create_model("factories:tiny", num_classes=3, in_chans=2, drop_rate=0.1, factory_args={"width": 4})
    # drop_path_rate is 0: not passed (a factory need not take it)
    assert model.called_with == {"num_classes": 3, "in_chans": 2, "width": 4, "drop_rate": 0.1}
    assert model(torch.zeros(2, 2, 16, 16)).shape == (2, 3)
    plain = create_model("factories:tiny", num_classes=3, in_chans=1)
    assert plain.called_with == {"num_classes": 3, "in_chans": 1, "width": 8}


@pytest.mark.parametrize(
    "name, message",
    [
        ("nowhere_pkg.nets:build",
         "model.names: 'nowhere_pkg.nets:build' does not import (No module named 'nowhere_pkg')"),
        ("factories:nope",
         "model.names: 'factories:nope' does not import (module 'factories' has no attribute 'nope')"),
        ("factories:NOT_CALLABLE", "model.names: 'factories:NOT_CALLABLE' is not callable (of type int)"),
        ("factories:not_a_module", "model.names: 'factories:not_a_module' returned a dict, not a torch.nn.Module"),
        ("factories:boom", "model.names: 'factories:boom' raised RuntimeError (no such layer) when called with "
                           "num_classes=3, in_chans=1"),
    ],
)  # fmt: skip
def test_a_factory_that_does_not_import_or_build_a_module_is_one_line(name, message):
    with pytest.raises(ConfigError) as e:
        create_model(name, num_classes=3, in_chans=1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_loading_refuses_a_factory_that_does_not_import_and_misplaced_settings():
    with pytest.raises(ConfigError, match=r"^model.names: 'examples.nosuch:build' does not import \(No module named"):
        load_config(None, ["model.names=[test_resnet, examples.nosuch:build]"])
    with pytest.raises(ConfigError, match=r"^model.names: 'factories:nope' does not import"):
        load_config(None, ["model.names=[factories:nope]"])
    with pytest.raises(ConfigError, match=r"^model.factory_args: invalid value 'factories:other'"):
        load_config(None, ["model.names=[factories:tiny]", "model.factory_args={'factories:other': {width: 4}}"])
    with pytest.raises(ConfigError, match=r"^model.pretrained: 'factories:tiny' is your own factory: there are no hub"):
        load_config(None, ["model.names=[factories:tiny]", "model.pretrained=true"])
    cfg = load_config(None, ["model.names=[factories:tiny, test_resnet]",
                             "model.factory_args={'factories:tiny': {width: 4}}"])  # fmt: skip
    assert cfg.model.factory_args == {"factories:tiny": {"width": 4}}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_pretrained_file_loads_into_the_factory_network_but_a_classifier_of_another_shape(tmp_path, fmt):
    torch.manual_seed(1)
    source = create_model("factories:tiny", num_classes=5, in_chans=1, factory_args={"width": 6})
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"tiny.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(weights, str(path))
    else:
        torch.save({"model": weights, "epoch": 3}, path)  # a training checkpoint: its `model` entry is the state dict
    same = create_model("factories:tiny", num_classes=5, in_chans=1, factory_args={"width": 6},
                        pretrained_file=str(path))  # fmt: skip
    for k, v in weights.items():
        assert torch.equal(same.state_dict()[k], v), k
    other_head = create_model("factories:tiny", num_classes=3, in_chans=1, factory_args={"width": 6},
                              pretrained_file=str(path))  # fmt: skip
    assert torch.equal(other_head.features[0].weight, weights["features.0.weight"])
    assert torch.equal(other_head.features[1].running_mean, weights["features.1.running_mean"])
    assert other_head.head.weight.shape == (3, 6)  # the factory's own classifier for 3 classes


def test_a_pretrained_file_that_does_not_fit_is_one_line(tmp_path):
    wider = create_model("factories:tiny", num_classes=5, in_chans=1, factory_args={"width": 6})
    path = tmp_path / "wider.safetensors"
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(path))
    with pytest.raises(ConfigError) as e:
        create_model("factories:tiny", num_classes=5, in_chans=1, pretrained_file=str(path))
    assert str(e.value).startswith(f"model.pretrained_file={path}: the weights do not fit 'factories:tiny': tensors ")
    assert "of another shape (e.g. 'features.0.weight': [6, 1, 3, 3] in the file, [8, 1, 3, 3] in the model)" in str(
        e.value
    )
    smallnet = create_model("examples.smallnet:build", num_classes=5, in_chans=1)
    path = tmp_path / "smallnet.safetensors"
    save_file({k: v.contiguous() for k, v in smallnet.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match=r"tensors \d+ missing from the file .*; \d+ not in the model") as e:
        create_model("factories:tiny", num_classes=5, in_chans=1, pretrained_file=str(path))
    assert "\n" not in str(e.value)


def test_preprocessing_of_a_factory_network_comes_from_the_config_its_own_cfg_or_the_defaults():
    smallnet = create_model("examples.smallnet:build", num_classes=10, in_chans=1)
    own = resolve_transform("examples.smallnet:build", DataConfig(image_size=16), 1, smallnet)  # its pretrained_cfg
    assert (own.interpolation, own.crop_pct, own.mean, own.std) == ("bilinear", 1.0, (0.5,), (0.5,))
    config = resolve_transform("examples.smallnet:build", DataConfig(image_size=16, mean=[0.2], std=[0.3],
                               interpolation="nearest", crop_pct=0.9), 1, smallnet)  # fmt: skip
    assert (config.interpolation, config.crop_pct, config.mean, config.std) == ("nearest", 0.9, (0.2,), (0.3,))
    tiny = create_model("factories:tiny", num_classes=10, in_chans=3)
    default = resolve_transform("factories:tiny", DataConfig(image_size=16), 3, tiny)  # no cfg: ImageNet's
    assert (default.interpolation, default.crop_pct, default.mean) == ("bicubic", 0.875, (0.485, 0.456, 0.406))


def test_the_example_network_builds_checkpoints_and_trains_at_small_sizes():
    torch.manual_seed(0)
    model = create_model("examples.smallnet:build", num_classes=10, in_chans=1, drop_rate=0.2,
                         factory_args={"width": 8})  # fmt: skip
    assert model.fc.in_features == 32 and model.drop.p == 0.2
    for size in (16, 32):
        assert model(torch.randn(4, 1, size, size)).shape == (4, 10)
    assert check_grad_checkpointing("examples.smallnet:build") == "stages"  # no timm hook: its top-level stages
    from distrain.distributed.checkpointing import apply_grad_checkpointing

    checkpointed = create_model("examples.smallnet:build", num_classes=10, in_chans=1, factory_args={"width": 8})
    checkpointed.load_state_dict(model.state_dict())
    apply_grad_checkpointing(checkpointed)
    x = torch.randn(4, 1, 16, 16)
    model.drop.p = 0.0
    for m in (model, checkpointed):
        m.train()
        m(x).square().mean().backward()
    torch.testing.assert_close(checkpointed.stem[0].weight.grad, model.stem[0].weight.grad)


def test_inputs_are_checked_by_building_the_factory_network_before_any_work():
    cfg = load_config(None, ["model.names=[examples.smallnet:build]", "data.image_size=16",
                             "model.factory_args={'examples.smallnet:build': {width: 4}}"])  # fmt: skip
    check_inputs(cfg, 1, torch.device("cpu"))
    for name, message in (("factories:boom", "raised RuntimeError"), ("factories:not_a_module", "returned a dict")):
        with pytest.raises(ConfigError, match=f"^model.names: '{name}' {message}"):
            check_inputs(load_config(None, [f"model.names=[{name}]"]), 1, torch.device("cpu"))


def test_a_new_factory_backbone_with_its_factory_args_grows_a_study():
    from distrain.orchestration.growth import growth_differences

    old = load_config(None, ["model.names=[test_resnet]"]).to_dict()
    new = load_config(None, ["model.names=[test_resnet, factories:tiny]",
                             "model.factory_args={'factories:tiny': {width: 4}}"]).to_dict()  # fmt: skip
    grows, refused = growth_differences(old, new)
    assert refused == [] and any(line.startswith("model.factory_args.factories:tiny.width") for line in grows)
    changed = load_config(None, ["model.names=[test_resnet, factories:tiny]",
                                 "model.factory_args={'factories:tiny': {width: 6}}"]).to_dict()  # fmt: skip
    assert growth_differences(new, changed)[1] == ["model.factory_args.factories:tiny.width: 4 -> 6"]
