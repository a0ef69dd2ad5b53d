"""``adapt.method: lora``: peft's adapters on the convolutions, every pretrained weight frozen, and their exports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from freezetune.config import AdaptConfig, FreezeConfig, LoraSpec, ModelConfig, load_config
from freezetune.errors import FreezeError
from freezetune.freezing.plan import apply_freeze
from freezetune.models.lora import has_lora, is_lora_parameter
from freezetune.models.weights import build_model
from freezetune.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from freezetune.training.recipe import Recipe

peft = pytest.importorskip("peft")

CLASSES = 4


def _base_weights(path: Path) -> Path:
    """A stand-in pretrained backbone: a seeded random ResNet18 with a 4-class head, as a weights file."""
    torch.manual_seed(11)
    model = build_model(ModelConfig(num_classes=CLASSES, weights="none")).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_at):
    """A LoRA run (rank 4, adapters on layer3 and layer4 only) from a weights file, trained 2 epochs."""
    root = tmp_path_factory.mktemp("lora")
    weights = _base_weights(root / "base.safetensors")
    cfg = tiny_at(root / "run", model__weights=str(weights), model__num_classes=CLASSES, adapt__method="lora",
                  adapt__lora__rank=4, freeze__until="layer2", train__epochs=2, optim__lr=0.05, data__val_size=8)
    recipe = Recipe(cfg).setup()
    summary = recipe.summarize(recipe.train())
    return cfg, recipe, summary, weights


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_only_the_adapters_and_the_head_train(lora_run):
    cfg, recipe, summary, _ = lora_run
    model = recipe.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if is_lora_parameter(n)}
    assert trainable == adapters | {"fc.weight", "fc.bias"}
    # Adapters on every convolution of layer3 and layer4 (the stages until: layer2 leaves), none before.
    convs = {n.split(".lora_")[0] for n in adapters}
    assert convs == {f"layer{s}.{b}.{c}" for s in (3, 4) for b in (0, 1) for c in ("conv1", "conv2")} | {
        "layer3.0.downsample.0", "layer4.0.downsample.0"}
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in adapters)
    ids = {id(p) for g in recipe.optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert summary["freeze"]["adapt"] == "lora" and summary["freeze_integrity"]["ok"]
    # Every BatchNorm is frozen, statistics included: all 20 stay in eval mode.
    assert summary["freeze"]["frozen_batchnorm_layers"] == 20


def test_the_base_weights_stay_bit_identical_to_the_weights_file(lora_run):
    _, recipe, _, weights = lora_run
    file = load_file(str(weights))
    state = recipe.model.state_dict()
    for name, tensor in file.items():
        if name.startswith("fc."):
            continue  # the head trains
        key = name if name in state else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(state[key], tensor), name
    # And the adapters moved: B starts at zero, so a trained adapter is one whose B is not zero.
    assert any(n.endswith("lora_B.default.weight") and t.abs().sum() > 0 for n, t in state.items())


def test_the_checkpoint_evaluates_to_the_summarys_accuracy(lora_run):
    from freezetune.evaluation import evaluate_run

    cfg, _, summary, _ = lora_run
    assert any(is_lora_parameter(k) for k in load_checkpoint(Path(cfg.output.dir) / CHECKPOINT_NAME)["model"])
    result = evaluate_run(cfg.output.dir)
    assert result.top1.accuracy == summary["val"]["accuracy"]


def test_the_merged_export_gives_the_trained_models_logits_without_peft(lora_run, tmp_path, cli):
    cfg, recipe, _, _ = lora_run
    dest = tmp_path / "merged.safetensors"
    result = cli("export", cfg.output.dir, "--out", dest)
    assert result.exit_code == 0, result.output
    state = load_file(str(dest))
    assert not any(is_lora_parameter(k) or "base_layer" in k for k in state)  # plain names
    plain = build_model(ModelConfig(num_classes=CLASSES, weights=str(dest))).model
    assert torch.allclose(_logits(plain, X), _logits(recipe.model, X), atol=1e-5, rtol=1e-4)


def test_the_peft_adapter_loads_with_peft_and_gives_the_same_logits(lora_run, tmp_path, cli):
    cfg, recipe, _, weights = lora_run
    dest = tmp_path / "adapter"
    result = cli("export", cfg.output.dir, "--format", "peft", "--out", dest)
    assert result.exit_code == 0, result.output
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in dest.iterdir()}
    # The base a user has: the architecture with 4 outputs and the weights the run started from.
    base = build_model(ModelConfig(num_classes=CLASSES, weights=str(weights))).model
    loaded = peft.PeftModel.from_pretrained(base, str(dest))
    assert torch.allclose(_logits(loaded, X), _logits(recipe.model, X), atol=1e-6, rtol=1e-5)
    again = cli("export", cfg.output.dir, "--format", "peft", "--out", dest)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_the_onnx_export_is_the_merged_network(lora_run, tmp_path, cli):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    cfg, recipe, _, _ = lora_run
    dest = tmp_path / "model.onnx"
    result = cli("export", cfg.output.dir, "--format", "onnx", "--out", dest)
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": X.numpy()})[0]
    expected = _logits(recipe.model, X).numpy()
    assert abs(got - expected).max() <= 1e-4 + 1e-4 * abs(expected).max()


def test_peft_format_needs_a_lora_run(tmp_path, tiny, cli):
    from freezetune.training.recipe import run

    cfg = tiny(freeze__trainable="[fc]")
    run(cfg)
    result = cli("export", cfg.output.dir, "--format", "peft", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "adapt.method: none" in result.stderr


def test_targets_follow_the_freeze_spec_and_bad_patterns_are_one_line(resnet18):
    spec = AdaptConfig(method="lora", lora=LoraSpec(target=["layer4.*.conv2"]))
    plan = apply_freeze(resnet18, FreezeConfig(), "resnet18", spec)
    assert {n.split(".lora_")[0] for n in plan.trainable if is_lora_parameter(n)} == {"layer4.0.conv2",
                                                                                     "layer4.1.conv2"}
    assert has_lora(resnet18)
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(num_classes=10, weights="none")).model
    with pytest.raises(FreezeError, match="the freeze selectors keep frozen"):
        apply_freeze(fresh, FreezeConfig(until="layer3"), "resnet18",
                     AdaptConfig(method="lora", lora=LoraSpec(target=["layer2.*"])))
    with pytest.raises(FreezeError, match="matches no convolution"):
        apply_freeze(fresh, FreezeConfig(), "resnet18", AdaptConfig(method="lora", lora=LoraSpec(target=["fc9"])))


def test_lora_options_without_the_method_are_refused():
    from freezetune.errors import ConfigError

    with pytest.raises(ConfigError, match="lora options apply only with method: lora"):
        load_config(None, ["adapt.lora.rank=4"])


def test_without_peft_lora_is_one_line_with_the_pip_command(tiny_yaml, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft then raises ImportError
    result = cli("train", "--config", tiny_yaml(adapt__method="lora"))
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "peft" in line and "pip install 'freezetune[peft]'" in line


def test_a_resumed_lora_run_is_bit_identical_to_a_straight_one(tmp_path, tiny_at):
    from freezetune.training.recipe import resume_config, run

    def cfg(out, **extra):
        return tiny_at(out, model__num_classes=CLASSES, adapt__method="lora", adapt__lora__rank=2,
                       adapt__lora__dropout=0.1, train__epochs=2, optim__lr=0.05, **extra)

    run(cfg(tmp_path / "straight"))
    run(cfg(tmp_path / "split", train__max_steps=6))  # mid-epoch, dropout's RNG included
    run(resume_config(tmp_path / "split", ["train.max_steps=8"]), resume=True)
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)["model"]
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["model"]
    assert set(a) == set(b) and any(is_lora_parameter(k) for k in a)
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key
