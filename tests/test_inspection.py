import copy
import io
import json
import re

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from freezetune.cli import app
from freezetune.config import load_config
from freezetune.freezing.params import count_params
from freezetune.freezing.plan import apply_freeze, unfreeze_all
from freezetune.inspection import graph_nodes, inspect_config, load_for_inspection, trace_graph
from freezetune.measure.flops import forward_flops_by_module, step_flops
from freezetune.models.weights import build_model
from freezetune.render.inspection import render

runner = CliRunner()
KEYS = {"model", "weights_source", "weights_notice", "freeze", "batch_size", "image_size", "depth",
        "params", "modules", "step_flops", "predicted_speedup", "activation_memory", "graph",
        "outside_backward_graph", "execution"}


TINY = ["model.weights=none", "data.image_size=32", "data.batch_size=4"]


def _config(*overrides):
    return load_config(None, [*TINY, *overrides])


# Inspecting costs a second or two on a busy CPU: share the reports between tests.
@pytest.fixture(scope="module")
def layer4_fc():
    return _config("freeze.trainable=[layer4,fc]")


@pytest.fixture(scope="module")
def layer4_fc_report(layer4_fc):
    return inspect_config(layer4_fc)


@pytest.fixture(scope="module")
def fc_only_deep():
    return inspect_config(_config("freeze.trainable=[fc]"), depth=4)


@pytest.fixture(scope="module")
def layer4_frozen_shallow():
    return inspect_config(_config("freeze.frozen=[layer4]"), depth=1)


def _frozen_model(config):
    torch.manual_seed(config.seed)
    model = build_model(config.model).model
    apply_freeze(model, config.freeze, config.model.name)
    return model


def _max_width(renderable) -> int:
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(renderable)
    return max(len(line) for line in console.export_text().splitlines())


def test_step_flops_are_flops_step_flops_frozen_and_full(layer4_fc, layer4_fc_report):
    cfg, r = layer4_fc, layer4_fc_report
    model = _frozen_model(cfg)
    args = (cfg.data.batch_size, cfg.data.image_size, cfg.model.num_classes)
    assert r.step_flops["frozen"] == step_flops(model, *args)
    for p in model.parameters():
        p.requires_grad_(True)
    assert r.step_flops["full"] == step_flops(model, *args)
    fr, fu = r.step_flops["frozen"], r.step_flops["full"]
    assert fr["forward"] == fu["forward"]  # freezing never changes the forward pass
    assert 0 < fr["backward"] < fu["backward"]
    assert r.predicted_speedup == pytest.approx(fu["total"] / fr["total"])
    assert r.predicted_speedup > 1


def test_fc_only_backward_is_tiny_and_graph_is_the_head(fc_only_deep):
    r = fc_only_deep
    fr, fu = r.step_flops["frozen"], r.step_flops["full"]
    assert fr["backward"] < 0.001 * fu["backward"]
    g = r.graph["frozen"]
    assert g.accumulate_grad == 2 and g.trainable_params_reached == 2 and g.frozen_params_reached == 0
    assert g.nodes < 10 < r.graph["full"].nodes
    assert r.outside_backward_graph == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                        "layer3", "layer4", "avgpool"]
    # Saved for backward: the fc input (B x 512 floats) plus the loss's few small tensors.
    batch = r.batch_size
    assert batch * 512 * 4 <= r.activation_memory["frozen_bytes"] <= batch * (512 * 4 + 10 * 4 + 8) + 64


def test_graph_frozen_smaller_than_full_and_reaches_no_frozen_param(layer4_fc, layer4_fc_report):
    r = layer4_fc_report
    model = _frozen_model(layer4_fc)
    trainable = sum(p.requires_grad for p in model.parameters())
    total = len(list(model.parameters()))
    fr, fu = r.graph["frozen"], r.graph["full"]
    assert fr.nodes < fu.nodes
    assert fr.accumulate_grad == fr.trainable_params_reached == trainable
    assert fu.accumulate_grad == fu.trainable_params_reached == total
    assert fr.frozen_params_reached == 0
    assert fr.node_types["AccumulateGrad"] == trainable
    assert "MaxPool2DWithIndicesBackward0" not in fr.node_types
    assert "MaxPool2DWithIndicesBackward0" in fu.node_types
    assert sum(fr.node_types.values()) == fr.nodes
    assert "layer3" in fr.modules_outside_graph and "layer4" not in fr.modules_outside_graph
    assert fu.modules_outside_graph == []
    assert r.outside_backward_graph == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]


def test_graph_nodes_of_the_autograd_example():
    a = torch.tensor([2.0, 3.0], requires_grad=True)
    b = torch.tensor([6.0, 4.0], requires_grad=True)
    q = 3 * a**3 - b**2
    names = sorted(type(n).__name__ for n in graph_nodes(q.grad_fn))
    assert names == ["AccumulateGrad", "AccumulateGrad", "MulBackward0", "PowBackward0",
                     "PowBackward0", "SubBackward0"]
    assert graph_nodes(None) == []


def test_saved_bytes_on_meta_equal_a_real_forward(layer4_fc):
    """The meta-device count must match what a real CPU forward saves for backward."""
    cfg = layer4_fc
    model = _frozen_model(cfg)
    for trainable in (False, True):
        if trainable:
            unfreeze_all(model)  # every parameter trains, every BatchNorm in train mode
        counted = trace_graph(model, cfg.data.batch_size, cfg.data.image_size)
        real = copy.deepcopy(model)
        params = {p.untyped_storage().data_ptr() for p in real.parameters()}
        saved = {}

        def pack(t, saved=saved, params=params):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        x = torch.randn(cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(real(x), torch.zeros(cfg.data.batch_size, dtype=torch.long))
        assert loss.requires_grad
        assert counted.saved_bytes == sum(saved.values())
        assert counted.saved_tensors == len(saved)


def test_activation_memory_figures_add_up(layer4_fc_report):
    m = layer4_fc_report.activation_memory
    assert 0 < m["frozen_bytes"] < m["full_bytes"]
    assert m["saved_bytes"] == m["full_bytes"] - m["frozen_bytes"]
    assert m["saved_pct"] == pytest.approx(100 * m["saved_bytes"] / m["full_bytes"])
    assert "saves" in m["what"] or "keeps" in m["what"]


def test_module_rows(layer4_fc, layer4_fc_report):
    r = layer4_fc_report
    rows = {row.name: row for row in r.modules}
    assert max(row.depth for row in r.modules) == 2 and "layer1.0.conv1" not in rows
    assert [n for n in rows if rows[n].depth == 1] == ["conv1", "bn1", "relu", "maxpool", "layer1",
                                                        "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert rows[""].trainable == "partial" and rows[""].kind == "ResNet"
    assert rows["layer1"].trainable == "no" and rows["layer4.0"].trainable == "yes"
    assert rows["relu"].trainable == "-" and rows["relu"].params == 0
    counts = count_params(_frozen_model(layer4_fc))
    assert rows[""].params == counts["total"] and rows[""].trainable_params == counts["trainable"]
    for name, c in counts["by_module"].items():
        assert (rows[name].params, rows[name].trainable_params) == (c["total"], c["trainable"])
    # One 32 px image leaves layer4 at 1x1, which BatchNorm refuses in train mode: count in eval.
    flops = forward_flops_by_module(_frozen_model(layer4_fc).eval(), layer4_fc.data.image_size)
    assert rows["layer2.1"].forward_flops == flops["layer2.1"] > 0
    assert rows[""].forward_flops == flops[""]
    assert rows["bn1"].batchnorm == "eval" and rows["layer4"].batchnorm == "train"
    assert rows[""].batchnorm == "mixed" and rows["fc"].batchnorm is None
    assert rows["layer4"].batchnorm_layers == {"train": 5, "eval": 0}
    assert rows["layer1"].in_backward_graph is False and rows["avgpool"].in_backward_graph is True
    assert r.freeze["frozen_batchnorm_layers"] == 15


def test_batchnorm_train_policy_and_depth(fc_only_deep):
    r = inspect_config(_config("freeze.trainable=[layer4,fc]", "freeze.batchnorm=train"), depth=1)
    rows = {row.name: row for row in r.modules}
    assert rows["layer1"].batchnorm == "train" and rows[""].batchnorm == "train"
    assert r.freeze["frozen_batchnorm_layers"] == 0
    assert max(row.depth for row in r.modules) == 1
    assert "layer2.0.downsample.0" in {row.name for row in fc_only_deep.modules}
    assert max(row.depth for row in fc_only_deep.modules) == 4


def test_frozen_layer_after_trainable_ones_stays_in_the_graph(layer4_frozen_shallow):
    r = layer4_frozen_shallow
    rows = {row.name: row for row in r.modules}
    assert rows["layer4"].trainable == "no" and rows["layer4"].in_backward_graph is True
    assert r.outside_backward_graph == []
    assert r.graph["frozen"].frozen_params_reached == 0
    assert 0 < r.step_flops["frozen"]["backward"] < r.step_flops["full"]["backward"]


def test_weights_auto_or_imagenet_without_cache_fall_back_to_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    for weights in ("auto", "imagenet"):
        loaded = load_for_inspection(_config(f"model.weights={weights}").model)
        assert loaded.weights_source == "random-init"
        assert "not in torchvision's cache" in loaded.notice and "random" in loaded.notice


def test_weights_file_is_used(tmp_path):
    path = tmp_path / "w.pth"
    state = build_model(_config().model).model.state_dict()
    torch.save(state, path)
    loaded = load_for_inspection(_config(f"model.weights={path}").model)
    assert loaded.weights_source == str(path) and loaded.notice is None
    assert torch.equal(loaded.model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_render_fits_80_columns(layer4_fc_report, fc_only_deep, layer4_frozen_shallow):
    for report in (layer4_fc_report, fc_only_deep, layer4_frozen_shallow):
        assert _max_width(render(report.to_dict())) <= 80
    notice = {**layer4_fc_report.to_dict(), "weights_notice": "ImageNet weights unavailable " * 5}
    assert _max_width(render(notice)) <= 80


def _write_config(tmp_path, text="freeze:\n  trainable: [layer4, fc]\n"):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_cli_json_parses_and_has_the_keys(tmp_path):
    result = runner.invoke(app, ["inspect", "--config", _write_config(tmp_path), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == KEYS
    assert data["graph"]["frozen"]["nodes"] < data["graph"]["full"]["nodes"]
    assert data["step_flops"]["frozen"]["backward"] < data["step_flops"]["full"]["backward"]
    assert data["modules"][0]["name"] == "" and data["batch_size"] == 4


def test_cli_prints_the_figures_in_80_columns(tmp_path, layer4_fc_report):
    result = runner.invoke(app, ["inspect", "-c", _write_config(tmp_path), *TINY], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    data = layer4_fc_report.to_dict()  # the same config, inspected from Python
    assert f"FLOP-predicted speedup: {data['predicted_speedup']:.2f}x" in out
    for key in ("frozen", "full"):
        assert f" {data['graph'][key]['nodes']} " in out
    assert "Outside the backward graph: conv1, bn1, relu, maxpool, layer1, layer2, layer3." in out


def test_cli_bad_pattern_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["inspect", "-c", _write_config(tmp_path), *TINY, "freeze.trainable=[nope]"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "matches no module" in result.stderr
    assert "Traceback" not in result.output


def test_nothing_frozen_has_no_savings():
    r = inspect_config(_config(), depth=1)
    assert r.step_flops["frozen"] == r.step_flops["full"] and r.predicted_speedup == 1
    assert r.activation_memory["saved_bytes"] == 0 and r.outside_backward_graph == []
    assert r.graph["frozen"].nodes == r.graph["full"].nodes


def test_inspect_says_how_train_would_run_the_step(tmp_path):
    from rich.console import Console

    from freezetune.config import load_config
    from freezetune.inspection import inspect_config
    from freezetune.render.inspection import execution

    cfg = load_config(None, ["model.weights=none", "data.image_size=32", "freeze.until=layer2", "device=cpu"])
    plan = inspect_config(cfg).execution
    assert plan["frozen_prefix"] == ["stem", "layer1", "layer2"] and plan["folded_batchnorm"]
    console = Console(width=200, record=True)
    console.print(execution(plan))
    text = console.export_text()
    assert re.search(r"prefix without autograd +on +stem\.\.layer2 is frozen", text)
    assert re.search(r"feature cache +off +train\.feature_cache is off", text)


def test_an_adapt_method_is_shown_and_counted_as_a_mask_like_any_other():
    r = inspect_config(_config("adapt.method=bn"), depth=1)
    assert r.freeze["adapt"] == "bn" and r.freeze["frozen_batchnorm_layers"] == 0
    # The convolutions are frozen: no weight gradients, so about 1.5x fewer FLOPs than full.
    assert 1.35 <= r.predicted_speedup <= 1.65
    # Only the stem's convolution: it sees the image and a frozen weight, so nothing before the
    # first BatchNorm needs a gradient; every later convolution passes one back to a BatchNorm.
    assert r.outside_backward_graph == ["conv1"]
    assert r.activation_memory["frozen_bytes"] <= r.activation_memory["full_bytes"]
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(render(r.to_dict()))
    assert "adapt.method: bn" in console.export_text()
