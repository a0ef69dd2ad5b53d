import pytest

from freezetune.config import Config, apply_overrides, load_config, parse_override
from freezetune.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.model.name == "resnet18" and cfg.optim.momentum == 0.9 and cfg.freeze.batchnorm == "frozen"


def test_override_parses_yaml_values():
    assert parse_override("optim.lr=0.05") == (["optim", "lr"], 0.05)
    assert parse_override("freeze.trainable=[layer4,fc]") == (["freeze", "trainable"], ["layer4", "fc"])
    assert parse_override("output.dir=a=b") == (["output", "dir"], "a=b")  # split on the first '='


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", "x=[unclosed"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_overrides_are_validated_like_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {lr: 0.1}\n"), ["optim.lr=0.5", "train.max_steps=5"])
    assert cfg.optim.lr == 0.5 and cfg.train.max_steps == 5
    with pytest.raises(ConfigError, match=r"override 'optim.lr=0': optim.lr"):
        load_config(write(tmp_path, "{}"), ["optim.lr=0"])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="seed is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_unknown_key_names_dotted_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    (line,) = e.value.problems
    assert str(path) in line and "optim.momentun" in line and "did you mean 'momentum'" in line


def test_every_problem_listed_at_once(tmp_path):
    path = write(tmp_path, "optim: {lr: -1}\ndata: {batch_size: 0, image_size: big}\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    keys = " ".join(e.value.problems)
    for key in ("optim.lr", "data.batch_size", "data.image_size", "bogus"):
        assert key in keys
    assert len(e.value.problems) == 4


@pytest.mark.parametrize(
    "text,key",
    [
        ("seed: '3'", "seed"),  # strict: a string is not an int
        ("device: gpu", "device"),
        ("model: {name: vgg17}", "model.name"),
        ("model: {weights: foo.bin}", "model.weights"),
        ("freeze: {trainable: [fc], until: layer3}", "freeze"),
        ("freeze: {trainable: []}", "freeze"),
        ("freeze: {batchnorm: maybe}", "freeze.batchnorm"),
        ("data: {source: imagefolder}", "data"),
        ("optim: {momentum: 0, nesterov: true}", "optim"),
        ("train: {epochs: 0}", "train.epochs"),
        ("adapt: {method: lora2}", "adapt.method"),
        ("adapt: {method: bn}\nfreeze: {schedule: [{epoch: 1, unfreeze: [layer4]}]}", "adapt"),
        ("adapt: {method: bias}\nfreeze: {auto: true}", "adapt"),
    ],
)
def test_rejected_values_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert any(f": {key}:" in p for p in e.value.problems), e.value.problems


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:2:8: YAML syntax error"):
        load_config(write(tmp_path, "seed: 1\noptim: : lr\n"))


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_int_accepted_for_float_and_round_trip():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0
    assert Config.model_validate(cfg.to_dict()) == cfg


def test_scientific_notation_is_a_float():
    # YAML 1.1 reads 1e-3 as a string; users mean a number.
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001
    assert parse_override("output.dir=run1e3") == (["output", "dir"], "run1e3")


def test_an_adapt_method_with_a_schedule_says_why_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "freeze: {schedule: [{epoch: 1, unfreeze: [layer4]}]}"), ["adapt.method=bn"])
    [problem] = e.value.problems
    assert "override 'adapt.method=bn'" in problem and "freeze.schedule" in problem and "\n" not in problem
