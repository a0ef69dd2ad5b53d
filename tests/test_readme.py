"""README.md must stay true: its two set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2
    for command in commands:
        assert command in ci.splitlines(), command


def test_readme_mentions_every_config_key():
    from freezetune.config import Config

    readme = (ROOT / "README.md").read_text()
    for section, field in Config.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        keys = [f"{section}.{k}" for k in sub] if sub else [section]
        for key in keys:
            assert f"`{key}`" in readme or f"`{key}`," in readme, key
