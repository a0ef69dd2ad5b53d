"""``freezetune plot``: runs' curves overlaid in one PNG; bad folders and paths are one line."""

import pytest
from matplotlib.figure import Figure

from freezetune.render.run_plot import PLOT_NAME, read_run, run_labels, training_figure


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_at):
    from freezetune.training.recipe import run

    base = tmp_path_factory.mktemp("plot")
    run(tiny_at(base / "a" / "full", train__epochs=2))
    run(tiny_at(base / "b" / "full", train__epochs=2, freeze__until="layer3"))
    return base / "a" / "full", base / "b" / "full"


def test_two_runs_are_overlaid_in_one_png(two_runs, tmp_path, cli):
    a, b = two_runs
    out = tmp_path / "curves.png"
    result = cli("plot", a, b, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "a/full (8 steps)" in result.stdout and "b/full (8 steps)" in result.stdout


def test_one_run_plots_into_its_own_folder_by_default(two_runs, cli):
    a, _ = two_runs
    assert cli("plot", a).exit_code == 0
    assert (a / PLOT_NAME).is_file()


def test_the_figure_has_loss_lr_accuracy_and_step_time_panels(two_runs):
    runs = [read_run(d) for d in two_runs]
    assert runs[0]["step"] == list(range(1, 9))
    assert run_labels(list(two_runs)) == ["a/full", "b/full"]
    fig = training_figure(runs, run_labels(list(two_runs)))
    assert isinstance(fig, Figure)
    titles = " ".join(ax.get_title().lower() + ax.get_ylabel().lower() for ax in fig.axes)
    for word in ("loss", "learning rate", "accuracy", "step time"):
        assert word in titles, titles


@pytest.mark.parametrize(("make", "message"), [
    (lambda t: [t / "nothing"], "no metrics.jsonl"),
    (lambda t: [t / "x", "--out", t / "x.jpg"], "must end with .png"),
    (lambda t: [t / "x", "--out", t / "missing" / "x.png"], "does not exist"),
])
def test_bad_plot_arguments_are_one_line(tmp_path, cli, make, message):
    (tmp_path / "nothing").mkdir()
    result = cli("plot", *make(tmp_path))
    assert result.exit_code == 2
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert message in line
