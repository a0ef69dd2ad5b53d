"""Configs no one wrote by hand: every generated document validates, or is refused one line per problem.

hypothesis generates YAML documents from the real schema's keys mixed with near-miss keys,
wrong types, extreme numbers, unicode, random nesting and anchors/aliases, and ``key=value``
overrides likewise. Whatever comes in, :func:`load_config` returns a Config (which dumps and
reloads to itself) or raises ConfigError whose every problem is one line; through the CLI that
is exit code 2 and no traceback.

CI runs a bounded number of examples. A long run: ``FREEZETUNE_FUZZ_EXAMPLES=10000 pytest
tests/test_config_fuzz.py``.
"""

from __future__ import annotations

import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from freezetune.config import Config, dump_config, load_config
from freezetune.errors import ConfigError

EXAMPLES = int(os.environ.get("FREEZETUNE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _sections(model: type[BaseModel] = Config) -> dict[str, list[str]]:
    """Each section's keys, from the schema itself (so new keys are fuzzed without editing this file)."""
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = list(ann.model_fields)
    return out


SECTIONS = _sections()
TOP_KEYS = list(Config.model_fields)
DOTTED = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + [k for k in TOP_KEYS if k not in SECTIONS]
# Values a real key is likely to be given: the right kind, and the kinds next to it.
WORDS = ["resnet18", "resnet50", "resnet", "layer3", "layer4", "fc", "stem", "none", "auto", "imagenet", "cpu",
         "cuda", "cuda:0", "cosine", "step", "constant", "frozen", "train", "synthetic", "imagefolder", "fp16",
         "bf16", "fp32", "on", "off", "*", "layer[1-4]", "percentile", "threshold", "", " ", "null"]


def near_misses(key: str) -> st.SearchStrategy[str]:
    """A key one slip away from ``key``: a dropped, doubled or swapped letter, another case, a suffix."""
    i = st.integers(0, max(len(key) - 1, 0))
    return st.one_of(
        i.map(lambda n: key[:n] + key[n + 1:]),
        i.map(lambda n: key[:n] + key[n:n + 1] * 2 + key[n + 1:]),
        i.map(lambda n: key[:n] + key[n + 1:n + 2] + key[n:n + 1] + key[n + 2:]),
        st.just(key.upper()), st.just(key + "s"), st.just(key.replace("_", "-")), st.just(f" {key}"),
    ).filter(lambda k: k != key)


def keys(real: list[str]) -> st.SearchStrategy:
    junk = st.one_of(st.text(max_size=12), st.integers(-3, 3), st.booleans(), st.none())
    return st.one_of(st.sampled_from(real), st.sampled_from(real).flatmap(near_misses), junk)


numbers = st.one_of(
    st.integers(-3, 300), st.integers(), st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e308, 0.5, 0.999999]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.sampled_from(WORDS), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys(WORDS + DOTTED), inner, max_size=4)), max_leaves=12)


@st.composite
def documents(draw) -> dict:
    """A config-shaped mapping; a value drawn once may be placed twice, which YAML writes as an anchor and alias."""
    doc = {}
    for key in draw(st.lists(keys(TOP_KEYS), max_size=7)):
        real = SECTIONS.get(key)
        if real is not None and draw(st.booleans()):
            doc[key] = draw(st.dictionaries(keys(real), values, max_size=6))
        else:
            doc[key] = draw(values)
    shared = [v for v in doc.values() if isinstance(v, dict | list)]
    if shared and draw(st.booleans()):
        doc[draw(keys(TOP_KEYS))] = draw(st.sampled_from(shared))  # the same object twice: &id001 / *id001
    return doc


def as_yaml(doc: dict, draw_raw: str | None) -> str:
    if draw_raw is not None:
        return draw_raw
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:  # e.g. a key YAML cannot write; then the plain repr is the document
        return repr(doc)


raw_texts = st.one_of(
    st.text(max_size=200),
    st.sampled_from([
        "a: &x [*x]",  # a recursive alias
        "base: &b {lr: 0.1}\noptim:\n  <<: *b\n  momentum: 0.5",  # a merge key
        "optim: !!python/object/apply:os.system ['echo pwned']",
        "model: {name: resnet18}\nmodel: {name: vgg11}",  # a key given twice
        "? [a, b]\n: 1",  # a complex key
        "train: {epochs: 1e400}",
        "---\nseed: 1\n---\nseed: 2",
        "\t- not yaml",
        "seed: 0x10\ndevice: 'cpu'\ntrain: {epochs: 0o7}",
        "data: {image_size: .inf, batch_size: .nan}",
        "\ufeffseed: 1",
        "model: {name: \"r\u00e9snet18\"}",
    ]),
)

override_values = st.one_of(
    st.sampled_from(WORDS), st.text(max_size=20), numbers.map(str),
    st.sampled_from(["[layer4,fc]", "[", "{a: 1}", "null", "~", "'quoted'", "=x", "a=b=c", "[1, [2, [3]]]",
                     "&a [*a]", "!!binary aGk=", "1e999", "-.inf", "true", "yes", "0x1F"]),
)
overrides = st.lists(st.one_of(
    st.tuples(keys(DOTTED), override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=20),  # perhaps no '=' at all
), max_size=4)


def check(path, given_overrides):
    """The property: a Config that round-trips, or one ConfigError line per problem."""
    try:
        config = load_config(path, given_overrides)
    except ConfigError as e:
        assert e.problems, "a ConfigError with no problem in it"
        for problem in e.problems:
            assert problem.strip() and len(problem.splitlines()) == 1, repr(problem)
            assert "Traceback" not in problem
        return
    again = yaml.safe_load(dump_config(config))
    assert Config.model_validate(again) == config


@FUZZ
@given(doc=documents(), raw=st.one_of(st.none(), st.none(), raw_texts), extra=overrides)
def test_any_yaml_document_validates_or_is_refused_one_line_per_problem(tmp_path_factory, doc, raw, extra):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(as_yaml(doc, raw), encoding="utf-8")
    check(path, extra)


@FUZZ
@given(extra=overrides)
def test_any_overrides_on_the_defaults_validate_or_are_refused_one_line_per_problem(extra):
    check(None, extra)


@settings(max_examples=min(EXAMPLES, 40), deadline=None, derandomize=EXAMPLES <= 150,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=documents(), raw=st.one_of(st.none(), raw_texts), extra=overrides)
def test_the_cli_answers_exit_0_or_2_and_never_a_traceback(tmp_path_factory, cli, doc, raw, extra):
    # `validate` builds the model to check the freeze patterns; a generated model name is one of
    # few words, so a valid one is small.
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(as_yaml(doc, raw), encoding="utf-8")
    result = cli("validate", "--config", path, *extra)
    assert result.exit_code in (0, 2), (result.exception, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and all(line.startswith("error: ") for line in lines), result.stderr


def _valid(path, extra) -> bool:
    try:
        load_config(path, extra)
    except ConfigError:
        return False
    return True


def test_the_generators_reach_valid_configs_too(tmp_path):
    # A fuzzer that only ever produced garbage would never test the accepting side: the very
    # strategies the properties above draw from must also produce configs that load.
    search = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
    extra = find(overrides, lambda o: bool(o) and _valid(None, o), settings=search)
    assert extra and "=" in extra[0]
    path = tmp_path / "config.yaml"

    def loads(doc) -> bool:
        path.write_text(as_yaml(doc, None), encoding="utf-8")
        return bool(doc) and _valid(path, [])

    doc = find(documents(), loads, settings=search)
    assert set(doc) <= set(TOP_KEYS) and typing.get_type_hints(Config)
    assert "model.name" in DOTTED and "freeze.auto" in DOTTED and "seed" in DOTTED


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
