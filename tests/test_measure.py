import pytest
import torch

from freezetune.errors import DeviceError
from freezetune.measure.device import resolve_device
from freezetune.measure.memory import peak_memory
from freezetune.measure.timing import percentile, timing_stats


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 10) == pytest.approx(1.0)
    assert percentile([7], 90) == 7


def test_timing_stats():
    s = timing_stats([0.1, 0.2, 0.3, 0.4, 10.0], batch_size=8)
    assert s["step_median_s"] == 0.3 and s["samples_per_s"] == pytest.approx(8 / 0.3)
    assert s["step_p10_s"] < s["step_median_s"] < s["step_p90_s"]
    assert timing_stats([], 8)["step_median_s"] is None


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cpu_peak_memory_is_process_rss():
    mem = peak_memory(torch.device("cpu"))
    assert mem["kind"] == "process_peak_rss" and mem["peak_bytes"] > 10 * 2**20


def test_saved_activations_count_what_backward_keeps_and_leave_the_weights_out():
    from torch import nn

    from freezetune.measure.memory import SavedActivations, memory_parts

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with SavedActivations(model) as saved:
        model(x).sum().backward()
    # The first layer saves its input (5x8), ReLU its output (5x16), the second layer its input,
    # the same storage as ReLU's output: counted once. The weights they save are not counted.
    assert saved.nbytes == (5 * 8 + 5 * 16) * 4 and saved.tensors == 2
    model[0].requires_grad_(False)
    with torch.no_grad(), SavedActivations(model) as none:
        model(x)
    assert none.nbytes == 0
    parts = memory_parts(model, 12, saved.nbytes)
    assert parts == {"param_bytes": (8 * 16 + 16 + 16 * 4 + 4) * 4, "grad_bytes": (16 * 4 + 4) * 4,
                     "optimizer_state_bytes": 12, "saved_activation_bytes": saved.nbytes}
