"""Models other than ResNet: names, heads, freeze points in each family's own stage names.

Big models are built on the meta device (structure only); the one real training run uses
mobilenet_v3_small at 32 px.
"""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from freezetune.config import FreezeConfig, ModelConfig, load_config
from freezetune.errors import ConfigError, FreezeError
from freezetune.freezing.plan import apply_freeze, match_parameters, modules_until
from freezetune.measure.flops import step_flops
from freezetune.models import catalog as zoo
from freezetune.models.catalog import replace_head
from freezetune.models.weights import build_model
from freezetune.speed.execution import decide_cache as decide
from freezetune.speed.prefix import frozen_prefix

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mobilenet_v3_small_example.yaml"


def frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def under(model, *prefixes):
    """Parameter names inside the given modules, or equal to the given parameter names."""
    return {n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)}


# --------------------------------------------------------------------------------------------
# names


def test_any_classification_model_is_accepted_and_typos_get_suggestions():
    assert ModelConfig(name="mobilenet_v3_small").name == "mobilenet_v3_small"
    assert ModelConfig(name="vit_b_16").name == "vit_b_16"
    with pytest.raises(ConfigError, match=r"unknown model 'mobilenetv3_small'.*did you mean 'mobilenet_v3_small'"):
        load_config(None, ["model.name=mobilenetv3_small"])
    with pytest.raises(ConfigError, match="detection/segmentation"):
        load_config(None, ["model.name=fasterrcnn_resnet50_fpn"])


def test_families():
    assert [zoo.family(n) for n in ("resnext50_32x4d", "mobilenet_v3_small", "efficientnet_v2_s",
                                    "convnext_tiny", "vit_b_16", "maxvit_t", "vgg11_bn")] == [
        "resnet", "mobilenet_v3", "efficientnet", "convnext", "vit", "maxvit", "vgg"]


# --------------------------------------------------------------------------------------------
# heads


@pytest.mark.parametrize("name,head", [
    ("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1"),
    ("convnext_tiny", "classifier.2"), ("vit_b_16", "heads.head"), ("squeezenet1_1", "classifier.1"),
])
def test_head_is_the_final_layer_and_is_replaced(name, head):
    model = zoo.meta_model(name)
    assert zoo.head_path(model) == head
    assert replace_head(model, 7)
    out = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 7)
    assert not replace_head(model, 7)


def test_build_model_replaces_a_small_models_head():
    loaded = build_model(ModelConfig(name="mobilenet_v3_small", num_classes=5, weights="none"))
    assert loaded.head_replaced and loaded.model.classifier[3].out_features == 5


def test_weights_file_loads_into_a_non_resnet(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    torch.save(state, tmp_path / "mnv3.pth")
    loaded = build_model(ModelConfig(name="mobilenet_v3_small", num_classes=10, weights=str(tmp_path / "mnv3.pth")))
    got = loaded.model.state_dict()
    assert torch.equal(got["features.9.block.0.0.weight"], state["features.9.block.0.0.weight"])
    assert got["classifier.3.weight"].shape == (10, 1024) and loaded.head_replaced
    # A file whose head already has num_classes outputs keeps its head.
    torch.save(loaded.model.state_dict(), tmp_path / "mnv3_10.pth")
    again = build_model(ModelConfig(name="mobilenet_v3_small", num_classes=10, weights=str(tmp_path / "mnv3_10.pth")))
    assert not again.head_replaced
    assert torch.equal(again.model.classifier[3].weight, loaded.model.classifier[3].weight)


def test_aux_classifiers_are_left_out():
    model = zoo.meta_model("googlenet").train()
    assert isinstance(model(torch.empty(2, 3, 64, 64, device="meta")), torch.Tensor)


# --------------------------------------------------------------------------------------------
# freeze points


@pytest.mark.parametrize("name", [
    "mobilenet_v3_small", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16",
    "regnet_y_400mf", "densenet121", "squeezenet1_1", "googlenet",
])
def test_stages_cover_every_parameter_once_and_end_with_the_head(name):
    model = zoo.meta_model(name)
    order = zoo.stages(name)
    assert list(order)[-1] == "head"
    inside = {stage: under(model, *members) for stage, members in order.items()}
    owners = {n: [s for s in order if n in inside[s]] for n, _ in model.named_parameters()}
    assert all(len(stages) == 1 for stages in owners.values()), {n: s for n, s in owners.items() if len(s) != 1}
    assert owners[zoo.head_path(model) + ".weight"] == ["head"]


@pytest.mark.parametrize("name,stage,frozen_modules", [
    ("mobilenet_v3_small", "stage2", ["features.0", "features.1", "features.2", "features.3"]),
    ("mobilenet_v3_small", "last_conv", [f"features.{i}" for i in range(13)]),
    ("efficientnet_b0", "stage3", ["features.0", "features.1", "features.2", "features.3"]),
    ("convnext_tiny", "stage2", ["features.0", "features.1", "features.2", "features.3"]),
    ("vit_b_16", "encoder_layer_1", ["class_token", "conv_proj", "encoder.pos_embedding",
                                     "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]),
])
def test_until_freezes_exactly_the_stages_up_to_it(name, stage, frozen_modules):
    model = zoo.meta_model(name)
    apply_freeze(model, FreezeConfig(until=stage), name)
    assert frozen_names(model) == under(model, *frozen_modules)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_each_freeze_point_freezes_one_more_stage(name):
    model = zoo.meta_model(name)
    order = zoo.stages(name)
    points = [s for s in order if s != "head"]
    frozen_before: set[str] = set()
    for stage in points:
        apply_freeze(model, FreezeConfig(until=stage), name)
        frozen = frozen_names(model)
        assert frozen == frozen_before | under(model, *order[stage]) and frozen > frozen_before
        frozen_before = frozen
    assert under(model, *order["head"]).isdisjoint(frozen_before)


def test_vit_root_parameters_follow_the_spec():
    model = zoo.meta_model("vit_b_16")
    apply_freeze(model, FreezeConfig(until="embed"), "vit_b_16")
    assert not model.class_token.requires_grad and not model.encoder.pos_embedding.requires_grad
    assert model.encoder.layers.encoder_layer_0.mlp[0].weight.requires_grad
    # Training only the last block and the head: the loose parameters of the model and of its
    # encoder (a container with a trainable child) must not stay trainable.
    apply_freeze(model, FreezeConfig(trainable=["encoder.layers.encoder_layer_11", "heads"]), "vit_b_16")
    assert not model.class_token.requires_grad and not model.encoder.pos_embedding.requires_grad
    assert model.encoder.layers.encoder_layer_11.ln_1.weight.requires_grad
    apply_freeze(model, FreezeConfig(frozen=["class_token"]), "vit_b_16")
    assert frozen_names(model) == {"class_token"}
    assert match_parameters(model, ["encoder"]) >= {"encoder.pos_embedding", "encoder.ln.weight"}


def test_unknown_freeze_point_lists_the_models_own_names():
    with pytest.raises(FreezeError, match=r"did you mean 'stage2'\?.*stem, stage1, stage2, stage3, stage4, last_conv"):
        modules_until("mobilenet_v3_small", "stag2")
    model = zoo.meta_model("vit_b_16")
    with pytest.raises(FreezeError, match="loose parameters: class_token, encoder.pos_embedding"):
        apply_freeze(model, FreezeConfig(frozen=["cls_token"]), "vit_b_16")


def test_image_size_the_model_cannot_take_is_a_config_error(monkeypatch):
    monkeypatch.setattr("freezetune.models.weights.build", zoo.meta_model)  # ViT-B is big: structure only
    model = build_model(ModelConfig(name="vit_b_16", weights="none")).model
    with pytest.raises(ConfigError, match=r"vit_b_16 is built for 224x224 images \(got 32x32\)"):
        model(torch.empty(1, 3, 32, 32, device="meta"))


# --------------------------------------------------------------------------------------------
# execution paths and FLOPs


def test_no_frozen_prefix_fast_path_outside_resnets(tiny):
    cfg = tiny(CONFIG, train__feature_cache="auto")
    model = zoo.meta_model("mobilenet_v3_small")
    apply_freeze(model, cfg.freeze, cfg.model.name)
    assert frozen_prefix(model, cfg.model.name) == []
    decision = decide(cfg, [], True)
    assert not decision.enabled and "ResNets only" in decision.reason
    with pytest.raises(ConfigError, match="ResNets only"):
        decide(tiny(CONFIG, train__feature_cache="on"), [], True)


def test_inspect_names_the_frozen_blocks_inside_a_single_trunk(tiny):
    from freezetune.inspection import inspect_config

    r = inspect_config(tiny(CONFIG, freeze__until="stage2"), depth=1)
    assert r.outside_backward_graph == ["features.0", "features.1", "features.2", "features.3"]
    assert r.graph["frozen"].frozen_params_reached == 0 and r.predicted_speedup > 1


def test_depthwise_convolution_backward_is_not_overcounted():
    # Backward of a conv whose input needs a gradient: input gradient + weight gradient, each
    # as many multiply-adds as the forward, whatever the groups.
    for groups in (1, 8):
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=groups),
                              nn.Flatten(), nn.Linear(8 * 8 * 8, 2))
        conv = step_flops(model, 2, 8, 2)["by_module"]["1"]
        assert conv["backward"] == 2 * conv["forward"]


# --------------------------------------------------------------------------------------------
# end to end


def test_train_mobilenet_end_to_end(tmp_path, cli, tiny_args):
    out = tmp_path / "run"
    result = cli("train", "--config", CONFIG, *tiny_args(out, train__max_steps=3))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["freeze_integrity"]["ok"]
    assert summary["freeze_integrity"]["tensors_checked"] > 0
    assert summary["speed"]["frozen_prefix"] == [] and not summary["speed"]["prefix_without_autograd"]
    model = zoo.meta_model("mobilenet_v3_small")
    replace_head(model, 10)
    frozen = under(model, *[f"features.{i}" for i in range(9)])  # stem..stage3
    assert summary["params"]["frozen"] == sum(p.numel() for n, p in model.named_parameters() if n in frozen)


def test_models_command_lists_families_and_details(cli):
    result = cli("models", "mobilenet*")
    assert result.exit_code == 0, result.output
    assert "mobilenet_v3_small" in result.stdout and "stage1..stage4" in result.stdout
    detail = cli("models", "mobilenet_v3_small", "--num-classes", "10")
    assert detail.exit_code == 0 and "last_conv" in detail.stdout and "classifier.3" in detail.stdout
    data = json.loads(cli("models", "vit_b_16", "--json").stdout)["models"][0]
    assert data["freeze_points"][:2] == ["embed", "encoder_layer_0"] and data["head"] == "heads.head"
    assert data["stages"]["embed"][1] == "class_token"
    assert data["params"] == torchvision.models.ViT_B_16_Weights.DEFAULT.meta["num_params"]
    bad = cli("models", "resnet19")
    assert bad.exit_code == 2 and "did you mean" in bad.output
    resnet = json.loads(cli("models", "resnet50", "--json").stdout)["models"][0]
    assert resnet["blocks"][:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"] and len(resnet["blocks"]) == 16
    assert "layer3.0..layer3.5" in " ".join(cli("models", "resnet50").stdout.split())


@pytest.mark.parametrize(("name", "blocks"), [("resnet18", (2, 2, 2, 2)), ("resnet50", (3, 4, 6, 3)),
                                             ("resnet101", (3, 4, 23, 3))])
def test_resnet_block_points_are_the_variants_own_blocks(name, blocks):
    points = zoo.block_points(name)
    expected = ["stem", *(f"layer{i + 1}.{b}" for i, n in enumerate(blocks) for b in range(n)), "head"]
    assert list(points) == expected
    assert zoo.is_block_point(name, "layer2.0") and not zoo.is_block_point(name, "layer2")
    assert zoo.stage_of(name, "layer3.1") == "layer3" and zoo.stage_of(name, "stem") == "stem"
    assert zoo.forward_modules(name)[:6] == ("conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1.1")
    assert zoo.forward_modules(name)[-2:] == ("avgpool", "fc")
    assert zoo.stage_blocks(name, "layer3") == tuple(f"layer3.{b}" for b in range(blocks[2]))
    assert zoo.stage_blocks(name, "stem") == zoo.stage_blocks(name, "head") == ()
    assert zoo.last_block(name, "layer4") == f"layer4.{blocks[3] - 1}" and zoo.last_block(name, "stem") == "stem"


def test_other_families_have_no_finer_points_than_their_stages():
    assert zoo.block_points("mobilenet_v3_small") == zoo.stages("mobilenet_v3_small")
    stage = next(iter(zoo.stages("mobilenet_v3_small")))
    assert zoo.stage_blocks("mobilenet_v3_small", stage) == () and zoo.last_block("mobilenet_v3_small", stage) == stage
