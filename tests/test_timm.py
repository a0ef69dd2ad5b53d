"""``model.name: timm/<name>``: building, freeze points from timm's own grouping, weights, errors.

Tiny timm models (resnet10t, convnext_atto), random init or a weights file made here; never the
network (conftest sets FREEZETUNE_OFFLINE).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from freezetune.config import FreezeConfig, ModelConfig, OptimConfig  # noqa: E402
from freezetune.errors import ConfigError, MissingExtraError, WeightsError  # noqa: E402
from freezetune.freezing.plan import apply_freeze  # noqa: E402
from freezetune.models import catalog, timm_models  # noqa: E402
from freezetune.models.listing import describe  # noqa: E402
from freezetune.models.structure import stage_members_cover  # noqa: E402
from freezetune.models.weights import build_model, imagenet_state_dict  # noqa: E402
from freezetune.speed.prefix import frozen_prefix, supports_prefix  # noqa: E402
from freezetune.training.checkpoint import load_checkpoint  # noqa: E402
from freezetune.training.optim import build_optimizer  # noqa: E402

RESNET = "timm/resnet10t"
CONVNEXT = "timm/convnext_atto"
RESNET_STAGES = {
    "stem": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "head": ("fc",),
}


def test_tiny_models_exist():
    assert {"resnet10t", "convnext_atto"} <= set(timm.list_models())


@pytest.mark.parametrize("name", [RESNET, CONVNEXT])
def test_build_respects_num_classes(name):
    loaded = build_model(ModelConfig(name=name, num_classes=7, weights="none"))
    assert loaded.weights_source == "random-init" and loaded.notice is None
    assert loaded.model.get_classifier().out_features == 7
    assert loaded.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert catalog.head_path(loaded.model) == ("fc" if name == RESNET else "head.fc")


def test_stages_come_from_timm_group_matcher():
    assert catalog.stages(RESNET) == RESNET_STAGES
    assert list(catalog.stages(CONVNEXT)) == ["stem", "stages_0", "stages_1", "stages_2", "stages_3", "head"]
    for name in (RESNET, CONVNEXT):
        model = catalog.meta_model(name)
        # One freeze point per timm coarse group (its last group, unmatched, is the neck + classifier).
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        order = catalog.stages(name)
        assert len(order) == len(groups)
        for (stage, members), gid in zip(order.items(), sorted(groups), strict=True):
            covered = [n for n, _ in model.named_parameters() if stage_members_cover(n, members)]
            assert covered == groups[gid], stage
        assert describe(name).fast_path is False


def test_feature_info_is_the_fallback_without_group_matcher():
    model = catalog.meta_model(RESNET)

    def no_matcher(coarse=False):
        raise NotImplementedError

    model.group_matcher = no_matcher
    assert timm_models.timm_stages(model) == RESNET_STAGES  # feature_info: act1, layer1..layer4


def test_models_command_lists_freeze_points(cli):
    result = cli("models", RESNET)
    assert result.exit_code == 0, result.output
    for stage, members in RESNET_STAGES.items():
        assert stage in result.stdout and members[0] in result.stdout
    data = json.loads(cli("models", RESNET, "--json", "--num-classes", 10).stdout)
    (row,) = data["models"]
    assert row["name"] == RESNET and row["family"] == "timm" and row["head"] == "fc"
    assert row["freeze_points"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert row["params"] == sum(p.numel() for p in timm.create_model("resnet10t", num_classes=10).parameters())


def test_freeze_until_trains_only_the_rest():
    model = build_model(ModelConfig(name=RESNET, num_classes=10, weights="none")).model
    plan = apply_freeze(model, FreezeConfig(until="layer2"), RESNET)
    frozen_tops = ("conv1.", "bn1.", "layer1.", "layer2.")
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_tops)), name
    assert set(plan.trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in build_optimizer(model, OptimConfig()).param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    # No frozen-prefix fast path for timm models: the ordinary forward with requires_grad=False.
    assert not supports_prefix(RESNET) and frozen_prefix(model, RESNET) == []


def test_train_keeps_frozen_tensors_bit_identical(cli, tiny_yaml, tmp_path):
    init = tmp_path / "init.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), init)
    cfg = tiny_yaml(model__name=RESNET, model__weights=str(init), freeze__until="layer3", optim__lr=0.5,
                    data__batch_size=2, data__train_size=4, data__val_size=2)
    result = cli("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["freeze_integrity"]["ok"]
    assert summary["weights"]["source"] == str(init) and summary["speed"]["frozen_prefix"] == []
    start = torch.load(init, weights_only=True)
    trained = load_checkpoint(out / "checkpoint.pt")["model"]  # the base merged back (checkpoint format 2)
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
    assert any(not torch.equal(start[k], trained[k]) for k in start if k.startswith("fc."))
    for name, tensor in start.items():
        if name.startswith(frozen):
            assert torch.equal(tensor, trained[name]), name  # BN running stats included


def test_weights_file_goes_through_pretrained_cfg_overlay(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = timm.create_model("convnext_atto", num_classes=5).state_dict()
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    calls = []
    real = timm.create_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    same = build_model(ModelConfig(name=CONVNEXT, num_classes=5, weights=str(path)))
    # The build that loads the weights (a cold cache of timm's stage grouping adds a meta build after it).
    (loads,) = [c for c in calls if c.get("pretrained")]
    assert loads["pretrained"] is True and loads["pretrained_cfg_overlay"]["file"] == str(path)
    assert not same.head_replaced
    assert all(torch.equal(state[k], v) for k, v in same.model.state_dict().items())  # head included
    other = build_model(ModelConfig(name=CONVNEXT, num_classes=3, weights=str(path)))
    assert other.head_replaced and other.model.get_classifier().out_features == 3
    assert torch.equal(other.model.stem[0].weight, state["stem.0.weight"])


def test_weights_file_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit timm/resnet10t") as err:
        build_model(ModelConfig(name=RESNET, num_classes=10, weights=str(path)))
    assert "\n" not in str(err.value)


def test_offline_auto_falls_back_and_imagenet_is_an_error(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    auto = build_model(ModelConfig(name=RESNET, num_classes=10, weights="auto"))
    assert auto.weights_source == "random-init" and "RANDOM INIT" in auto.notice and "timm's cache" in auto.notice
    with pytest.raises(WeightsError, match="not in timm's cache"):
        build_model(ModelConfig(name=RESNET, num_classes=10, weights="imagenet"))


def test_imagenet_from_timms_cache_without_the_network(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    url = timm.create_model("resnet10t", pretrained=False).pretrained_cfg["url"]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    state = timm.create_model("resnet10t").state_dict()  # a stand-in for the published 1000-class file
    torch.save(state, cached)
    loaded = build_model(ModelConfig(name=RESNET, num_classes=10, weights="imagenet"))
    assert loaded.weights_source == "imagenet" and loaded.head_replaced
    assert torch.equal(loaded.model.conv1[0].weight, state["conv1.0.weight"])
    assert loaded.model.get_classifier().out_features == 10
    assert torch.equal(imagenet_state_dict(RESNET, allow_download=False)["fc.weight"], state["fc.weight"])


def test_unknown_timm_model_is_one_line_exit_2(cli, tiny_yaml):
    with pytest.raises(ConfigError, match=r"unknown timm model 'timm/resnet10q'; did you mean .*'timm/resnet10t'"):
        catalog.check_model_name("timm/resnet10q")
    for args in (("models", "timm/nope"), ("validate", "--config", tiny_yaml(), "model.name=timm/nope")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "timm/nope" in lines[0] and "Traceback" not in result.output


def test_timm_missing_gives_the_install_hint(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    hint = r"needs timm, which is not installed: pip install 'freezetune\[timm\]'"
    with pytest.raises(MissingExtraError, match=hint):
        catalog.check_model_name(RESNET)
    with pytest.raises(MissingExtraError, match=r"pip install 'freezetune\[timm\]'"):
        build_model(ModelConfig(name=RESNET, num_classes=10, weights="none"))
    result = cli("models", RESNET)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'freezetune[timm]'" in lines[0]
    catalog.check_model_name("resnet18")  # torchvision models do not need timm
