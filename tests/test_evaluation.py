"""``freezetune evaluate``: top-1/top-5, per class, confusion; equal to the run's own validation."""

import json

import pytest
from PIL import Image

pytest.importorskip("torchmetrics")

from freezetune.evaluation import EVAL_SCHEMA_VERSION, class_difference, evaluate_run  # noqa: E402
from freezetune.render.evaluation import confusion_figure  # noqa: E402

CLASSES = ("circle", "square", "triangle")


def image_folder(root, classes=CLASSES, per_class=(6, 3)):
    """train/ and val/ with one folder per class; each class its own colour, so a few steps learn something."""
    for split, n in zip(("train", "val"), per_class, strict=True):
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                Image.new("RGB", (36, 36), (80 * i % 256, 40 * j % 256, 200 - 60 * i % 200)).save(
                    root / split / cls / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_at):
    from freezetune.training.recipe import run

    base = tmp_path_factory.mktemp("eval")
    root = image_folder(base / "data")
    cfg = tiny_at(base / "run", data__source="imagefolder", data__root=str(root), model__num_classes=3,
                  train__epochs=2, freeze__trainable="[layer4,fc]")
    return base / "run", run(cfg), root


def test_on_the_runs_own_val_split_accuracy_equals_the_summarys(folder_run, cli):
    run_dir, summary, _ = folder_run
    result = cli("evaluate", run_dir)
    assert result.exit_code == 0, result.output
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["schema_version"] == EVAL_SCHEMA_VERSION
    assert record["top1"]["accuracy"] == summary["val"]["accuracy"]
    assert record["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-5)
    assert record["samples"] == 9 and record["classes"] == list(CLASSES)
    assert record["top5"]["k"] == 3 and record["top5"]["accuracy"] == 1.0  # 3 classes: top-3 is everything
    assert sum(map(sum, record["confusion"])) == 9
    assert [r["samples"] for r in record["per_class"]] == [3, 3, 3]
    assert sum(r["correct"] for r in record["per_class"]) == record["top1"]["correct"]
    assert (run_dir / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "same accuracy" in result.stdout and "top-1 accuracy" in result.stdout


def test_an_exported_safetensors_gives_the_same_figures(folder_run, tmp_path, cli):
    run_dir, summary, _ = folder_run
    weights = tmp_path / "model.safetensors"
    assert cli("export", run_dir, "--out", weights).exit_code == 0
    result = evaluate_run(run_dir, checkpoint=weights)
    assert result.weights_kind == "weights"
    assert result.top1.accuracy == summary["val"]["accuracy"]


def test_any_folder_with_the_same_classes_is_evaluated_and_written_where_asked(folder_run, tmp_path, cli):
    run_dir, _, _ = folder_run
    other = image_folder(tmp_path / "other", per_class=(1, 2))
    result = cli("evaluate", run_dir, "--data", other, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert record["data"]["kind"] == "folder" and record["samples"] == 6
    assert record["summary"] is None  # not the run's own split: nothing to compare with


def test_a_folder_with_other_classes_is_refused_with_one_line_naming_the_difference(folder_run, tmp_path, cli):
    run_dir, _, _ = folder_run
    other = image_folder(tmp_path / "other", classes=("circle", "square", "star"), per_class=(1, 1))
    result = cli("evaluate", run_dir, "--data", other)
    assert result.exit_code == 2
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert "missing triangle" in line and "not in the run: star" in line


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "nowhere"], "not val, train or a folder"),
    (["--checkpoint", "missing.pt"], "file not found"),
    (["--batch-size", "0"], "'--batch-size'"),
])
def test_bad_evaluate_options_are_one_line(folder_run, cli, args, message):
    run_dir, _, _ = folder_run
    result = cli("evaluate", run_dir, *args)
    assert result.exit_code == 2
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert message in line


def test_class_difference_names_what_is_missing_and_extra():
    assert class_difference(["a", "c"], ["a", "b"]) == (
        "its classes differ from the run's: 2 classes where the run has 2; missing b; not in the run: c")


def test_the_confusion_figure_stays_legible_with_100_classes():
    n = 100
    names = [f"class_{i:03d}_with_a_long_name" for i in range(n)]
    conf = [[10 if i == j else (1 if j == (i + 1) % n else 0) for j in range(n)] for i in range(n)]
    result = {"confusion": conf, "classes": names, "model": "resnet18", "run_dir": "runs/x", "step": 9,
              "data": {"kind": "folder", "root": "data/val"}, "samples": 1100, "loss": 0.3,
              "top1": {"accuracy": 10 / 11}, "top5": {"k": 5, "accuracy": 1.0},
              "per_class": [{"accuracy": 10 / 11} for _ in range(n)]}
    fig = confusion_figure(result)
    width, height = fig.get_size_inches()
    assert 20 <= height <= 22 and width > height  # grows with the classes, up to a cap
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == n and all(len(t) <= 18 for t in labels)  # every class keeps its (cut) label
    assert not ax.texts  # no per-cell counts at 100 classes


@pytest.mark.parametrize(("trainable", "prefix"), [
    ("[layer4,fc]", "stem, layer1, layer2, layer3"),
    ("[layer2.1,layer3,layer4,fc]", "stem, layer1, layer2.0"),  # a prefix that ends inside a stage
])
def test_a_cached_runs_evaluation_goes_through_its_folded_prefix_as_its_validation_did(folder_run, tiny_at, tmp_path,
                                                                                     cli, trainable, prefix):
    # The run's validation ran the frozen prefix with BatchNorm folded (other kernels, other last
    # bits than the plain model): evaluate takes the same path, so top-1 and loss agree exactly.
    from freezetune.training.recipe import run

    _, _, root = folder_run
    cfg = tiny_at(tmp_path / "cached", data__source="imagefolder", data__root=str(root), model__num_classes=3,
                  train__epochs=2, freeze__trainable=trainable, train__feature_cache="on")
    summary = run(cfg)
    assert summary["speed"]["feature_cache"]["enabled"] and summary["speed"]["folded_batchnorm"]
    result = cli("evaluate", tmp_path / "cached")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "cached" / "eval.json").read_text())
    assert any(f"through the frozen prefix ({prefix}, BatchNorm folded)" in n for n in record["notes"])
    assert record["top1"]["correct"] == round(summary["val"]["accuracy"] * 9)
    assert record["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-6, abs=1e-7)
