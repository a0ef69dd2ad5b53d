import pytest
import torch
import torchvision
from safetensors.torch import save_file

from freezetune.config import ModelConfig
from freezetune.errors import WeightsError
from freezetune.models.weights import build_model, imagenet_state_dict, read_weights_file


def reference_state(num_classes=1000, seed=1):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_weights_file_and_replaces_head(tmp_path, suffix):
    state = reference_state(1000)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = build_model(ModelConfig(num_classes=10, weights=str(path)))
    got = loaded.model.state_dict()
    assert torch.equal(got["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    assert got["fc.weight"].shape == (10, 512) and loaded.head_replaced
    assert loaded.weights_source == str(path)


def test_matching_head_is_loaded_too(tmp_path):
    state = reference_state(10)
    torch.save(state, tmp_path / "w.pt")
    loaded = build_model(ModelConfig(num_classes=10, weights=str(tmp_path / "w.pt")))
    assert torch.equal(loaded.model.fc.weight, state["fc.weight"]) and not loaded.head_replaced


@pytest.mark.parametrize("num_classes", [1000, 10], ids=["head-of-the-builder's-width", "a-new-head"])
def test_a_file_without_a_head_loads_every_tensor_and_initialises_only_the_head(tmp_path, num_classes):
    # The model is built without initialising what the file replaces: every tensor but the head
    # must then come from the file, and the head (neither loaded nor new) gets its usual init.
    state = {k: v for k, v in reference_state(1000).items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "body.pt")
    torch.manual_seed(0)
    loaded = build_model(ModelConfig(num_classes=num_classes, weights=str(tmp_path / "body.pt")))
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    head = loaded.model.fc
    assert head.out_features == num_classes and torch.isfinite(head.weight).all()
    bound = 1 / 512**0.5  # nn.Linear's init: uniform within 1/sqrt(fan_in)
    assert head.weight.abs().max() <= bound and head.weight.std() > bound / 4
    torch.manual_seed(0)
    again = build_model(ModelConfig(num_classes=num_classes, weights=str(tmp_path / "body.pt")))
    assert torch.equal(again.model.fc.weight, head.weight)  # seeded: the same head every time


def test_freezetune_checkpoint_is_accepted(tmp_path):
    state = reference_state(10)
    torch.save({"model": state, "optimizer": {}, "step": 3}, tmp_path / "checkpoint.pt")
    loaded = build_model(ModelConfig(num_classes=10, weights=str(tmp_path / "checkpoint.pt")))
    assert torch.equal(loaded.model.fc.bias, state["fc.bias"])


def test_mismatched_weights_name_the_keys(tmp_path):
    state = torchvision.models.resnet34(num_classes=10).state_dict()
    torch.save(state, tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys: layer1\.2\."):
        build_model(ModelConfig(num_classes=10, weights=str(tmp_path / "r34.pth")))
    state = reference_state(10)
    state["layer2.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    del state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"missing keys: layer4\.1\.bn2\.bias.*shape mismatch: layer2\.0\.conv1"):
        build_model(ModelConfig(num_classes=10, weights=str(tmp_path / "bad.pth")))


def test_non_state_dict_files_are_rejected(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(WeightsError, match="junk.pth"):
        read_weights_file(tmp_path / "junk.pth")
    torch.save({"a": 1}, tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        read_weights_file(tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="not found"):
        read_weights_file(tmp_path / "missing.safetensors")


def test_imagenet_reads_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = reference_state(1000, seed=5)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    loaded = build_model(ModelConfig(num_classes=10, weights="imagenet"))
    assert loaded.weights_source == "imagenet" and loaded.notice is None
    assert torch.equal(loaded.model.conv1.weight, state["conv1.weight"])


def test_imagenet_offline_says_how_to_place_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd.pth.*place it at .*or set model.weights"):
        imagenet_state_dict("resnet18", allow_download=False)


def test_auto_falls_back_to_random_init_with_notice(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    loaded = build_model(ModelConfig(weights="auto"))
    assert loaded.weights_source == "random-init" and "RANDOM INIT" in loaded.notice


def test_auto_tries_the_download_quietly(tmp_path, monkeypatch, capfd):
    # torch.hub prints "Downloading: ..." before it finds out there is no network; under auto
    # that line would precede the notice that says the weights are unavailable.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("FREEZETUNE_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(url, *args, **kwargs):
        print(f'Downloading: "{url}" to somewhere')
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    loaded = build_model(ModelConfig(weights="auto"))
    assert "Name or service not known" in loaded.notice
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err


def test_none_is_random_init():
    loaded = build_model(ModelConfig(name="resnet34", num_classes=3, weights="none"))
    assert loaded.weights_source == "random-init" and loaded.model.fc.out_features == 3
