import json
from pathlib import Path

import pytest
import torch

from freezetune.errors import RunDirError
from freezetune.freezing.integrity import fingerprint
from freezetune.training.optim import check_optimizer, optimizer_state_bytes
from freezetune.training.recipe import Recipe, Reporter, run
from freezetune.training.run_dir import read_jsonl


def test_run_writes_the_run_folder_contract(tiny):
    cfg = tiny(freeze__trainable="[layer4,fc]")
    summary = run(cfg)
    out = Path(cfg.output.dir)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary, default=str))
    for key in ("total", "trainable", "frozen", "by_module"):
        assert key in summary["params"]
    for key in ("step_median_s", "step_p10_s", "step_p90_s", "samples_per_s"):
        assert summary["timing"][key] > 0
    assert summary["memory"]["peak_bytes"] > 0
    assert summary["loss"]["first"] is not None and summary["val"]["accuracy"] is not None
    assert summary["weights"]["source"] == "random-init"
    assert summary["freeze_integrity"] == {**summary["freeze_integrity"], "ok": True}
    assert summary["freeze_integrity"]["tensors_checked"] > 0
    assert set(summary["versions"]) == {"torch", "torchvision"}
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) >= {"step", "epoch", "loss", "step_time_s", "lr"}
    assert records[0]["warmup"] and not records[1]["warmup"]
    assert summary["timing"]["steps_timed"] == 3
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "step", "epoch"} <= set(ckpt) and ckpt["step"] == 4
    assert (out / "config.yaml").read_text().startswith("seed:")


def test_frozen_tensors_bit_identical_and_trainable_ones_move(tiny):
    cfg = tiny(freeze__trainable="[fc]", train__epochs=2, optim__lr=0.5)
    r = Recipe(cfg).setup()
    before = fingerprint(r.model, r.plan)
    fc_before = r.model.fc.weight.detach().clone()

    summary = r.summarize(r.train())
    assert fingerprint(r.model, r.plan) == before
    assert summary["freeze_integrity"]["ok"]
    assert not torch.equal(fc_before, r.model.fc.weight)
    assert all(p.grad is None for n, p in r.model.named_parameters() if not n.startswith("fc."))


def test_batchnorm_train_policy_lets_statistics_move(tiny):
    cfg = tiny(freeze__trainable="[fc]", freeze__batchnorm="train")
    r = Recipe(cfg).setup()
    mean_before = r.model.bn1.running_mean.clone()

    summary = r.summarize(r.train())
    assert not torch.equal(mean_before, r.model.bn1.running_mean)
    assert summary["freeze_integrity"]["ok"]  # only parameters are promised under batchnorm: train


@pytest.mark.parametrize("method", ["bn", "bias"])
def test_a_sliver_trains_and_every_other_weight_stays_bit_identical(tiny, method):
    cfg = tiny(adapt__method=method, train__epochs=2, optim__lr=0.5)
    r = Recipe(cfg).setup()
    before = fingerprint(r.model, r.plan)
    weights = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    mean_before = r.model.layer2[0].bn1.running_mean.clone()
    ids = {id(p) for g in r.optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for n, p in r.model.named_parameters() if n in set(r.plan.trainable)}

    summary = r.summarize(r.train())
    assert fingerprint(r.model, r.plan) == before and summary["freeze_integrity"]["ok"]
    assert summary["freeze"]["adapt"] == method
    moved = {n for n, p in r.model.named_parameters() if not torch.equal(weights[n], p)}
    assert moved and moved <= set(r.plan.trainable) and "layer3.0.conv1.weight" not in moved
    assert "layer3.0.bn1.bias" in moved and "fc.weight" in moved
    # The BatchNorm layers train (a sliver of each), so their statistics follow the new data.
    assert not torch.equal(mean_before, r.model.layer2[0].bn1.running_mean)
    check_optimizer(r.optimizer, r.model)


def test_optimizer_holds_only_trainable_and_state_is_small(tiny):
    r = Recipe(tiny(freeze__trainable="[fc]")).setup()
    ids = {id(p) for g in r.optimizer.param_groups for p in g["params"]}
    assert ids == {id(r.model.fc.weight), id(r.model.fc.bias)}
    r.train()
    check_optimizer(r.optimizer, r.model)
    assert optimizer_state_bytes(r.optimizer) == (512 * 10 + 10) * 4


def test_max_steps_caps_and_reporter_sees_every_step(tiny):
    seen = []

    class Collect(Reporter):
        def step(self, record):
            seen.append(record["step"])

    summary = run(tiny(train__epochs=3, train__max_steps=5), Collect())
    assert seen == [1, 2, 3, 4, 5] and summary["steps"] == 5


def test_synthetic_data_is_learnable(tiny):
    # The quickstart promise: accuracy well above chance within a few epochs, even from random init.
    cfg = tiny(
        freeze__trainable="[layer4,fc]", data__train_size=128, data__val_size=64, data__batch_size=16,
        train__epochs=3, optim__lr=0.02,
    )
    summary = run(cfg)
    assert summary["loss"]["last"] < summary["loss"]["first"]
    assert summary["val"]["accuracy"] > 0.3  # chance is 0.1


def test_existing_run_folder_is_not_overwritten(tiny, tmp_path):
    cfg = tiny()
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("precious")
    with pytest.raises(RunDirError, match="not empty"):
        run(cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": False})}))
    assert (out / "summary.json").read_text() == "precious"
