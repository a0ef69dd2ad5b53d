from freezetune.config import FreezeConfig
from freezetune.freezing.plan import apply_freeze
from freezetune.measure.flops import forward_flops_by_module, step_flops

BATCH, SIZE, CLASSES = 4, 32, 10  # CLASSES: the head of the resnet18 fixture


def flops_with(model, **spec):
    apply_freeze(model, FreezeConfig(**spec), "resnet18")
    return step_flops(model, BATCH, SIZE)


def test_more_trainable_layers_cost_more(resnet18):
    full = flops_with(resnet18)
    layer4_fc = flops_with(resnet18, trainable=["layer4", "fc"])
    fc_only = flops_with(resnet18, until="layer4")
    assert full["total"] > layer4_fc["total"] > fc_only["total"] > 0


def test_forward_does_not_depend_on_the_mask(resnet18):
    forwards = {flops_with(resnet18, until=u)["forward"] for u in (None, "stem", "layer2", "layer4")}
    assert len(forwards) == 1


def test_full_step_is_about_three_forwards(resnet18):
    full = flops_with(resnet18)
    # Backward costs two forwards (input and weight gradients), less the first conv's input gradient.
    assert 2.5 <= full["total"] / full["forward"] <= 3.5
    assert full["total"] == full["forward"] + full["backward"]


def test_frozen_prefix_has_no_backward_flops(resnet18):
    counts = flops_with(resnet18, until="layer2")["by_module"]
    for name in ("conv1", "layer1", "layer2"):
        assert counts[name]["forward"] > 0
        assert counts[name]["backward"] == 0, name
    for name in ("layer3", "layer4", "fc"):
        assert counts[name]["backward"] > 0, name


def test_fc_only_backward_is_just_the_weight_gradient(resnet18):
    fc_only = flops_with(resnet18, until="layer4")
    # grad of fc.weight is a (classes x batch) @ (batch x 512) product; no input gradient is needed.
    assert fc_only["backward"] == 2 * BATCH * 512 * CLASSES
    assert set(fc_only["by_module"]) >= {"conv1", "layer1", "layer4", "fc"}


def test_by_module_sums_to_the_total(resnet18):
    f = flops_with(resnet18, trainable=["layer4", "fc"])
    assert sum(m["forward"] for m in f["by_module"].values()) == f["forward"]
    assert sum(m["backward"] for m in f["by_module"].values()) == f["backward"]


def test_counting_leaves_the_model_alone(resnet18):
    apply_freeze(resnet18, FreezeConfig(until="layer3"), "resnet18")
    before = {n: (p.device.type, p.requires_grad) for n, p in resnet18.named_parameters()}
    step_flops(resnet18, BATCH, SIZE)
    assert {n: (p.device.type, p.requires_grad) for n, p in resnet18.named_parameters()} == before
    assert all(p.grad is None for p in resnet18.parameters())


def test_a_count_is_kept_per_structure_mask_and_shape(resnet18, monkeypatch):
    from collections import OrderedDict

    import freezetune.measure.flops as flops

    monkeypatch.setattr(flops, "_COUNTS", OrderedDict())  # counts other tests left here
    first = flops_with(resnet18, until="layer2")
    first["by_module"].clear()  # a caller's edits stay in its copy
    calls = []
    monkeypatch.setattr(flops, "_count_step", lambda *a: calls.append(a) or {"recounted": True})
    again = step_flops(resnet18, BATCH, SIZE)
    assert calls == [] and again["by_module"]["layer2"]["backward"] == 0
    # Another mask, batch or class count is another computation, so it is counted afresh.
    assert flops_with(resnet18, until="layer3") == {"recounted": True}
    assert step_flops(resnet18, BATCH + 1, SIZE) == {"recounted": True}
    assert step_flops(resnet18, BATCH, SIZE, num_classes=3) == {"recounted": True}
    assert len(calls) == 3


def test_another_architecture_with_the_same_parameter_shapes_is_counted_afresh(resnet18):
    import copy

    from torch import nn

    strided = copy.deepcopy(resnet18)
    strided.conv1 = nn.Conv2d(3, 64, 7, stride=4, padding=3, bias=False)  # same shapes and mask, stride 4
    assert step_flops(strided, BATCH, SIZE)["forward"] < step_flops(resnet18, BATCH, SIZE)["forward"]


def test_a_batchnorm_only_step_costs_about_two_thirds_of_full(resnet18):
    from freezetune.config import AdaptConfig

    full = flops_with(resnet18)
    apply_freeze(resnet18, FreezeConfig(), "resnet18", AdaptConfig(method="bn"))
    bn_only = step_flops(resnet18, BATCH, SIZE)
    # Every convolution is frozen but sits between trainable BatchNorm layers: its input gradient
    # is needed, its weight gradient is not. Backward is then one pass, not two.
    assert bn_only["forward"] == full["forward"]
    assert 0.60 <= bn_only["total"] / full["total"] <= 0.72
    assert bn_only["by_module"]["layer1"]["backward"] < full["by_module"]["layer1"]["backward"] * 0.55


def test_a_cached_block_prefix_skips_exactly_its_blocks_forward(resnet18):
    from freezetune.config import load_config
    from freezetune.speed.prefix import training_step_flops

    apply_freeze(resnet18, FreezeConfig(until="layer2.0"), "resnet18")
    cfg = load_config(None, [f"data.batch_size={BATCH}", f"data.image_size={SIZE}", f"model.num_classes={CLASSES}"])
    full = training_step_flops(resnet18, cfg, None)
    by_stage = training_step_flops(resnet18, cfg, ["stem", "layer1"])
    by_block = training_step_flops(resnet18, cfg, ["stem", "layer1", "layer2.0"])
    # The whole-stage prefix leaves by_module as before: its modules are gone, nothing else moved.
    assert "layer1" not in by_stage["by_module"] and by_stage["by_module"]["layer2"] == full["by_module"]["layer2"]
    block = forward_flops_by_module(resnet18, SIZE)["layer2.0"] * BATCH
    assert block > 0
    assert by_block["total"] == by_stage["total"] - block
    assert by_block["by_module"]["layer2"]["forward"] == full["by_module"]["layer2"]["forward"] - block
    assert by_block["backward"] == full["backward"]
