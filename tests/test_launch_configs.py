import pytest
from accelerate.commands.config.config_args import ClusterConfig

from conftest import REPO

FILES = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


def test_there_are_launch_configs():
    assert {f.name for f in FILES} >= {"cpu_2proc.yaml", "single_gpu.yaml", "one_node_8gpu.yaml", "multi_node.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_accelerate_yaml_parses_with_known_keys(path):
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 1
    if cfg.distributed_type == "DEEPSPEED":  # accelerate refuses mixed_precision next to a deepspeed_config_file
        assert cfg.mixed_precision is None and cfg.deepspeed_config["deepspeed_config_file"].endswith(".json")
    else:
        assert cfg.mixed_precision == "no"  # precision is the experiment's (train.precision)


def test_unknown_accelerate_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "launch/accelerate/cpu_2proc.yaml").read_text() + "num_procesess: 2\n")
    with pytest.raises(ValueError, match="num_procesess"):
        ClusterConfig.from_yaml_file(str(bad))
