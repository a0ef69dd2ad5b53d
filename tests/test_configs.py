"""Every shipped config validates, resolves its freeze spec, and shows its exact command."""

from pathlib import Path

import pytest

from freezetune.config import load_config
from freezetune.freezing.plan import preview

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_the_promised_configs_exist():
    names = {p.name for p in CONFIGS}
    assert names >= {"quickstart.yaml", "resnet18_linear_probe.yaml", "resnet18_layer4.yaml",
                     "resnet18_full.yaml", "imagefolder_example.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_header_gives_command(path):
    cfg = load_config(path)
    _, plan = preview(cfg.model, cfg.freeze)
    assert plan.trainable
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"freezetune train --config configs/{path.name}" in line for line in header)


def test_quickstart_runs_offline():
    cfg = load_config(CONFIGS[0].parent / "quickstart.yaml")
    assert cfg.data.source == "synthetic" and cfg.model.weights == "auto"
    assert cfg.freeze.trainable == ["layer4", "fc"]
