import pytest

from distalign.config import ConfigError, OfflineConfig, field_help, load_config

BASE = ["method=dpo", "model.name_or_path=m", "data.train=d.jsonl"]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "method: dpo\nmodel: {name_or_path: m}\ndata: {train: d.jsonl}\n"
                           "optim: {learning_rate: 1e-5}\nloss: {beta: 0.2}\n")
    cfg = load_config(OfflineConfig, path, ["train.batch_size=4", "model.lora.r=4"])
    assert cfg.optim.learning_rate == 1e-5 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.train.batch_size == 4 and cfg.loss == {"beta": 0.2}
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 16


@pytest.mark.parametrize("override, message", [
    ("optim.lr=1", "unknown key 'optim.lr'; valid keys: learning_rate"),
    ("optim.learning_rate=fast", "field 'optim.learning_rate': expected float, got str 'fast'"),
    ("train.batch_size=1.5", "field 'train.batch_size': expected int, got float"),
    ("train.batch_size=0", "field 'train.batch_size': must be >= 1"),
    ("train.mixed_precision=fp8", "field 'train.mixed_precision': must be one of"),
    ("data.max_length=10", "field 'data.max_length': must exceed max_prompt_length"),
    ("model=3", "field 'model': expected a mapping"),
    ("nonsense", "expected key=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(OfflineConfig, None, [*BASE, override])


def test_missing_required_fields_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="field 'model.name_or_path': required"):
        load_config(OfflineConfig, None, ["method=dpo", "data.train=d"])
    with pytest.raises(ConfigError, match="c.yaml: top level must be a mapping"):
        load_config(OfflineConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML at line 2"):
        load_config(OfflineConfig, write(tmp_path, "method: dpo\n  bad: [\n"))
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(OfflineConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="c.yaml: unknown key 'trian'"):
        load_config(OfflineConfig, write(tmp_path, "trian: {}\n"))


def test_every_field_has_help():
    rows = field_help(OfflineConfig)
    assert len(rows) > 25
    assert all(help_text for _, help_text, _ in rows), [n for n, h, _ in rows if not h]
