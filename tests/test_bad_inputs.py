"""Every bad input: exit code 2, one line on stderr naming the problem, no traceback, no damage.

Each case builds its inputs in ``tmp_path`` and returns the command line and what the error line
must mention. Every case also has a finished-looking earlier run folder next to it; no file that
existed before the command may change.
"""

import logging
import os
import re
from pathlib import Path

import pytest
import torch

CONFIG = """\
seed: 0
device: cpu
model: {name: resnet18, num_classes: 2, weights: none}
freeze: {trainable: [fc]}
data: {source: synthetic, image_size: 32, batch_size: 4, train_size: 8, val_size: 0}
train: {epochs: 1, warmup_steps: 0}
"""


def train(tmp_path: Path, *overrides: str, config: Path | None = None) -> list:
    if config is None:
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG)
    return ["train", "--config", config, f"output.dir={tmp_path / 'new_run'}", *overrides]


def images(root: Path, corrupt: bool = False) -> Path:
    from PIL import Image

    for i, cls in enumerate(("cat", "dog")):
        (root / "train" / cls).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (40, 40), (90 * i, 60 * j, 120)).save(root / "train" / cls / f"{j}.png")
    if corrupt:
        (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


def folder_overrides(root: Path) -> list[str]:
    return ["data.source=imagefolder", f"data.root={root}"]


# Each case: tmp_path -> (command line, [what the error must mention]).


def missing_config(t):
    return train(t, config=t / "nope.yaml"), ["nope.yaml", "not found"]


def yaml_syntax_error(t):
    bad = t / "bad.yaml"
    bad.write_text("seed: 0\nmodel:\n  name: resnet18\n  num_classes: [2\ndata: {}\n")
    return train(t, config=bad), [re.compile(r"bad\.yaml:\d+:\d+: YAML syntax error")]


def unknown_key(t):
    bad = t / "bad.yaml"
    bad.write_text(CONFIG + "optim: {lr_rate: 0.1}\n")
    return train(t, config=bad), ["optim.lr_rate", "unknown key"]


def wrong_type(t):
    return train(t, "data.batch_size=eight"), ["data.batch_size"]


def zero_lr(t):
    return train(t, "optim.lr=0"), ["optim.lr"]


def negative_lr(t):
    return train(t, "optim.lr=-0.1"), ["optim.lr"]


def zero_batch_size(t):
    return train(t, "data.batch_size=0"), ["data.batch_size"]


def malformed_override(t):
    return train(t, "optim.lr"), ["optim.lr", "dotted.key=value"]


def pattern_matches_nothing(t):
    return train(t, "freeze.trainable=[layer9]"), ["layer9", "matches no module"]


def nothing_left_to_train(t):
    return train(t, "freeze.frozen=['*']", "freeze.trainable=null"), ["nothing to train"]


def weights_missing(t):
    return train(t, f"model.weights={t / 'missing.pth'}"), ["missing.pth", "not found"]


def weights_not_a_weights_file(t):
    junk = t / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    return train(t, f"model.weights={junk}"), ["junk.pth"]


def weights_not_safetensors(t):
    junk = t / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    return train(t, f"model.weights={junk}"), ["junk.safetensors", "safetensors"]


def weights_wrong_shapes(t):
    import torchvision

    state = torchvision.models.resnet18(num_classes=2).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, t / "odd.pth")
    return train(t, f"model.weights={t / 'odd.pth'}"), ["odd.pth", "shape mismatch", "conv1.weight"]


def imagefolder_root_missing(t):
    return train(t, *folder_overrides(t / "nowhere")), ["nowhere", "not found"]


def imagefolder_without_class_folders(t):
    (t / "imgs" / "train").mkdir(parents=True)
    (t / "imgs" / "train" / "stray.png").write_bytes(b"")
    return train(t, *folder_overrides(t / "imgs")), ["no class folders"]


def imagefolder_corrupt_image(t):
    root = images(t / "imgs", corrupt=True)
    return train(t, *folder_overrides(root)), [str(root / "train" / "cat" / "broken.png"), "skip_bad_images"]


def cuda_without_cuda(t):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return train(t, "device=cuda"), ["cuda", "CUDA is not available"]


def output_not_writable(t):
    (t / "a_file").write_text("not a folder")
    return train(t, f"output.dir={t / 'a_file' / 'run'}"), ["output.dir", "a_file"]


def output_not_empty(t):
    return train(t, f"output.dir={t / 'old_run'}"), ["old_run", "not empty", "output.overwrite"]


def resume_missing_folder(t):
    return ["train", "--resume", t / "no_such_run"], ["no_such_run"]


CASES = [
    missing_config, yaml_syntax_error, unknown_key, wrong_type, zero_lr, negative_lr, zero_batch_size,
    malformed_override, pattern_matches_nothing, nothing_left_to_train, weights_missing,
    weights_not_a_weights_file, weights_not_safetensors, weights_wrong_shapes,
    imagefolder_root_missing, imagefolder_without_class_folders, imagefolder_corrupt_image,
    cuda_without_cuda, output_not_writable, output_not_empty, resume_missing_folder,
]
# Config validation may report several problems, one line each; these must each name the key.
CONFIG_CASES = {unknown_key, wrong_type, zero_lr, negative_lr, zero_batch_size}


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, case, cli):
    old = tmp_path / "old_run"  # an earlier run's folder that must survive untouched
    old.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        (old / name).write_bytes(os.urandom(64))
    args, expect = case(tmp_path)
    before = snapshot(tmp_path)

    result = cli(*args)

    assert result.exit_code == 2, (result.exception, result.output)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case in CONFIG_CASES:
        assert lines and all(expect[0] in line for line in lines), lines
    else:
        assert len(lines) == 1, lines
    for want in expect:
        if isinstance(want, re.Pattern):
            assert want.search(lines[0]), lines[0]
        else:
            assert want in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before  # nothing that existed was changed


def test_skip_bad_images_trains_and_warns_naming_the_file(tmp_path, caplog, cli):
    root = images(tmp_path / "imgs", corrupt=True)
    args = train(tmp_path, *folder_overrides(root), "data.skip_bad_images=true")
    with caplog.at_level(logging.WARNING):
        result = cli(*args)
    assert result.exit_code == 0, result.output
    broken = str(root / "train" / "cat" / "broken.png")
    assert broken in caplog.text + result.stderr
    assert (tmp_path / "new_run" / "summary.json").is_file()


# --------------------------------------------------------------------------------------------
# every other command: a bad option value, a missing or wrong path, an unknown command


def _config_file(t):
    path = t / "config.yaml"
    path.write_text(CONFIG)
    return path


COMMAND_CASES = {
    "unknown command": (lambda t: ["trian"], ["No such command 'trian'", "freezetune --help"]),
    "unknown option": (lambda t: ["train", "--bogus"], ["No such option: --bogus", "freezetune train --help"]),
    "missing --config": (lambda t: ["inspect"], ["Missing option '--config'"]),
    "inspect: config missing": (lambda t: ["inspect", "--config", t / "nope.yaml"], ["nope.yaml"]),
    "compare: steps not a number": (
        lambda t: ["compare", "depths", "--config", _config_file(t), "--steps", "abc"],
        ["'--steps'", "got 'abc'", "freezetune compare depths --help"]),
    "compare: steps zero": (
        lambda t: ["compare", "frozen-vs-full", "--config", _config_file(t), "--steps", "0", "--out", t / "c"],
        ["'--steps'", "greater than or equal to 1", "got '0'"]),
    "export: no run folder": (
        lambda t: ["export", t / "no_run", "--out", t / "m.safetensors"], ["no_run"]),
    "export: wrong suffix": (
        lambda t: ["export", t / "old_run", "--out", t / "m.bin"], ["must end with .safetensors"]),
    "models: unknown model": (lambda t: ["models", "resnet9000"], ["resnet9000"]),
    "demo: steps out of range": (lambda t: ["demo", "frozen", "--steps", "1000"], ["'--steps'", "got '1000'"]),
    "demo: bad vector": (lambda t: ["demo", "autograd", "--a", "x,y"], ["x,y"]),
    "sweep: target not a number": (
        lambda t: ["sweep", "--config", _config_file(t), "--target", "x"], ["'--target'", "got 'x'"]),
    "sweep: resume of no sweep": (lambda t: ["sweep", "--resume", t / "old_run"], ["old_run"]),
    "bench: steps zero": (lambda t: ["bench", "--steps", "0", "--out", t / "b"], ["--steps must be at least 1"]),
    "bench: out is a file": (
        lambda t: ["bench", "--out", t / "old_run" / "summary.json"], ["--out", "not a folder"]),
    "bench: bad device": (lambda t: ["bench", "--device", "gpu", "--out", t / "b"], ["--device 'gpu'"]),
}


@pytest.mark.parametrize("name", list(COMMAND_CASES))
def test_every_command_refuses_bad_input_with_one_line(tmp_path, cli, name):
    old = tmp_path / "old_run"
    old.mkdir()
    for f in ("config.yaml", "summary.json"):
        (old / f).write_bytes(os.urandom(64))
    make, expect = COMMAND_CASES[name]
    args = make(tmp_path)
    before = snapshot(tmp_path)
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for want in expect:
        assert want in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before
