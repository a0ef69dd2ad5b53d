"""README.md must stay true and short: its two set-up commands are the ones CI runs, it names every
command, and what it no longer holds lives in docs/ (see tests/test_docs.py for the links)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_README_LINES = 250


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2
    for command in commands:
        assert command in ci.splitlines(), command


def test_config_doc_mentions_every_config_key():
    # The config reference moved from README.md to docs/config.md; tests/test_docs.py also walks
    # the nested models and lists of models (freeze.schedule[].epoch, ...).
    from freezetune.config import Config

    doc = (ROOT / "docs" / "config.md").read_text()
    for section, field in Config.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        keys = [f"{section}.{k}" for k in sub] if sub else [section]
        for key in keys:
            assert f"`{key}`" in doc or f"`{key}`," in doc, key


def test_readme_is_short_enough_to_read_to_the_end():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_readme_keeps_the_recorded_quickstart_output():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- sample:quickstart -->\n(.*?)<!-- /sample:quickstart -->", readme, re.DOTALL)
    assert match, "the quickstart sample markers are gone"
    sample = match.group(1)
    assert "\n```\n" in sample and sample.rstrip().endswith("```")
    for line in ("trainable params: 8,398,858 || all params: 11,181,642 || trainable%: 75.1129",
                 "│ freeze integrity      │ OK (90 frozen tensors, sha256) │"):
        assert line in sample, line


def _cli_commands() -> list[str]:
    """Every ``freezetune`` command as typed: ``train``, ``compare depths``, ..."""
    import typer.main

    from freezetune.cli import app

    names = []
    for name, command in typer.main.get_command(app).commands.items():
        subcommands = getattr(command, "commands", None)  # a group such as ``compare``
        if subcommands:
            names += [f"{name} {sub}" for sub in subcommands]
        else:
            names.append(name)
    return names


def test_readme_command_table_names_every_command():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `freezetune")]
    missing = [name for name in _cli_commands()
               if not any(re.match(rf"\| `freezetune {re.escape(name)}( |`)", row) for row in rows)]
    assert not missing, f"README.md's command table lacks: {', '.join(missing)}"
    assert any(row.startswith("| `freezetune bench [--ci]`") for row in rows)


def test_readme_says_how_to_choose_what_to_freeze():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Which layers should I freeze?", 1)[1].split("\n## ", 1)[0]
    assert "`freezetune sweep" in section and "time to target accuracy" in section
    assert "`freezetune compare depths" in section
    assert "](docs/sweep.md)" in section


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/guide.md", "docs/sweep.md", "docs/config.md", "docs/benchmarks.md", "docs/architecture.md"):
        assert f"]({page})" in readme, page
