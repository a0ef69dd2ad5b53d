"""The docs cannot drift: every config key is in docs/config.md, and every relative link resolves."""

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from freezetune.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "config.md"

# docs/config.md may name a key that does not exist only to show what a typo looks like.
DELIBERATELY_WRONG_KEYS = {"optim.lr_rate"}
# The lead engineer writes docs/architecture.md; until it lands, links to it are the one allowed gap.
MAY_BE_MISSING = {DOCS / "architecture.md"}


def _models_in(annotation) -> list[tuple[type[BaseModel], bool]]:
    """The pydantic models inside a field's annotation, each with whether it sits inside a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    found = []
    in_list = typing.get_origin(annotation) in (list, tuple, set, frozenset)
    for arg in typing.get_args(annotation):
        found += [(model, in_list or listed) for model, listed in _models_in(arg)]
    return found


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: ``optim``, ``optim.lr``, ``optim.param_groups[].match``, ..."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        for sub, in_list in _models_in(field.annotation):
            keys += config_keys(sub, key + ("[]." if in_list else "."))
    return list(dict.fromkeys(keys))


def test_the_walk_reaches_nested_models_and_lists_of_models():
    keys = config_keys()
    for key in ("seed", "device", "model.weights", "freeze.schedule", "freeze.schedule[].lr_mult",
                "optim.param_groups[].match", "optim.param_groups[].weight_decay", "output.overwrite"):
        assert key in keys, key
    assert len(keys) == len(set(keys))


def test_config_doc_names_every_config_key():
    text = CONFIG_DOC.read_text()
    missing = [key for key in config_keys() if f"`{key}`" not in text]
    assert not missing, f"docs/config.md does not document: {', '.join(missing)}"


def test_config_doc_names_no_key_the_schema_lacks():
    sections = "|".join(Config.model_fields)
    named = set(re.findall(rf"`((?:{sections})(?:\.\w+(?:\[\])?)+)`", CONFIG_DOC.read_text()))
    unknown = sorted(named - set(config_keys()) - DELIBERATELY_WRONG_KEYS)
    assert not unknown, f"docs/config.md documents keys the schema does not have: {', '.join(unknown)}"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`]+`", "", text)


def _links(path: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _prose(path.read_text()))


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE) and not target.startswith("#")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    code_free = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", code_free, flags=re.MULTILINE):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_points_to_a_file_that_exists():
    broken = []
    for path in _markdown_files():
        for target in filter(_relative, _links(path)):
            file = (path.parent / target.split("#", 1)[0]).resolve()
            if file.exists() or file in MAY_BE_MISSING:
                continue
            broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_link_to_a_heading_names_one_that_exists():
    broken = []
    for path in _markdown_files():
        for target in _links(path):
            if not (_relative(target) or target.startswith("#")) or "#" not in target:
                continue
            name, anchor = target.split("#", 1)
            file = (path.parent / name).resolve() if name else path
            if file.suffix != ".md" or not file.exists():
                continue  # a missing file is the test above's business
            if anchor not in _anchors(file):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing headings:\n" + "\n".join(broken)


def test_the_docs_name_the_bench_command_not_the_old_script():
    for path in _markdown_files():
        text = path.read_text()
        assert "python scripts/bench.py" not in text, f"{path.name}: write `freezetune bench`"
        for paragraph in re.split(r"\n\s*\n", text):
            if "bench.py" in paragraph:
                assert "shim" in paragraph and "freezetune bench" in paragraph, f"{path.name}: {paragraph}"


def test_benchmark_table_rows_are_the_recorded_ones():
    # Figures are moved, never retyped: each row of a table in docs/benchmarks.md is a row of one of
    # the raw result files it links to.
    recorded = {line for path in (ROOT / "benchmarks").glob("*.md") for line in path.read_text().splitlines()}
    rows = [line for line in (DOCS / "benchmarks.md").read_text().splitlines() if re.match(r"\| \d+px \|", line)]
    assert rows
    retyped = [row for row in rows if row not in recorded]
    assert not retyped, "rows not in benchmarks/*.md:\n" + "\n".join(retyped)
