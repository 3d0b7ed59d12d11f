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
    assert all(row.help for row in rows), [row.name for row in rows if not row.help]


def all_schemas():
    """Every config schema a command loads, with the offline `loss:` schema of every method."""
    from distalign.config.irl import IRLConfig
    from distalign.config.online import OnlineConfig
    from distalign.config.online_pairwise import NashConfig, OnlinePairwiseConfig
    from distalign.config.testbed import MixedFeedbackConfig
    from distalign.evaluation import EvalConfig
    from distalign.objectives import PAIRWISE_OBJECTIVES
    yield from ((cls.__name__, cls, None) for cls in (OnlineConfig, OnlinePairwiseConfig, NashConfig,
                                                      IRLConfig, MixedFeedbackConfig, EvalConfig))
    for method in ("sft", "reward", *PAIRWISE_OBJECTIVES):
        yield f"OfflineConfig[{method}]", OfflineConfig, {"method": method}


@pytest.mark.parametrize("name, schema, values", list(all_schemas()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_numeric_field_declares_a_range_that_holds_its_default(name, schema, values):
    rows = field_help(schema, values=values)
    assert sum(row.numeric for row in rows) >= 3, name
    missing = [row.name for row in rows if row.numeric and row.range is None]
    assert not missing, f"{name}: numeric fields without a range: {missing}"
    outside = [row.name for row in rows if row.numeric and row.default is not None and row.range.problem(row.default)]
    assert not outside, f"{name}: defaults outside their range: {outside}"


def test_online_loss_schema_covers_every_online_objective():
    """OnlineLossConfig holds every hyperparameter an online objective's advantage function takes."""
    import dataclasses

    from distalign.config.online import OnlineLossConfig
    from distalign.objectives import ONLINE_OBJECTIVES
    fields = {f.name for f in dataclasses.fields(OnlineLossConfig)}
    for name, objective in ONLINE_OBJECTIVES.items():
        assert set(objective.hyperparameters()) <= fields, name


@pytest.mark.parametrize("spelling, value", [
    ("5e-2", 0.05), ("1E5", 1e5), (".5", 0.5), ("+1.0", 1.0), ("1_000.0", 1000.0), ("1e+2", 100.0),
    ("2", 2.0), ("'0.25'", 0.25), ("1.5e-3", 1.5e-3)])
def test_loss_values_take_every_float_spelling(spelling, value):
    cfg = load_config(OfflineConfig, None, [*BASE, f"loss.beta={spelling}"])
    assert cfg.loss == {"beta": value} and isinstance(cfg.loss["beta"], float)


def test_loss_is_typed_from_the_objective_signature():
    cfg = load_config(OfflineConfig, None, ["method=cpo", "model.name_or_path=m", "data.train=d",
                                            "loss.variant=simple", "loss.margin=5"])  # clip would refuse tau
    assert cfg.loss["variant"] == "simple" and cfg.loss["margin"] == 5.0 and cfg.loss["beta"] == 0.1
    with pytest.raises(ConfigError, match=r"field 'loss.variant': must be one of \['full', 'simple', 'clip'\]"):
        load_config(OfflineConfig, None, ["method=cpo", "model.name_or_path=m", "data.train=d", "loss.variant=x"])
    with pytest.raises(ConfigError, match="unknown key 'loss.beta'; valid keys: margin, l2"):
        load_config(OfflineConfig, None, ["method=reward", "model.name_or_path=m", "data.train=d", "loss.beta=1"])
    assert load_config(OfflineConfig, None, ["method=sft", "model.name_or_path=m", "data.train=d"]).loss == {}
    names = [row.name for row in field_help(OfflineConfig, values={"method": "robust_dpo"})]
    assert {"loss.beta", "loss.epsilon", "loss.variant"} <= set(names)


def test_errors_name_the_origin_of_the_value(tmp_path):
    path = write(tmp_path, "method: dpo\nmodel: {name_or_path: m}\ndata: {train: d.jsonl}\n"
                           "train: {max_steps: -5}\nrewards: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'rewards'"):
        load_config(OfflineConfig, path)
    path = write(tmp_path, "method: dpo\nmodel: {name_or_path: m}\ndata: {train: d.jsonl}\ntrain: {max_steps: -5}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: field 'train\.max_steps': must be >= 0, got -5"):
        load_config(OfflineConfig, path)
    with pytest.raises(ConfigError, match=r"^command line: field 'train\.save_every': must be >= 0"):
        load_config(OfflineConfig, path, ["train.max_steps=3", "train.save_every=-1"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'optim\.lr'"):
        load_config(OfflineConfig, path, ["train.max_steps=3", "optim.lr=1"])
    # a mapping replaced on the command line: its values come from there
    with pytest.raises(ConfigError, match=r"^command line: field 'train\.log_every': must be >= 1"):
        load_config(OfflineConfig, path, ["train={log_every: 0}"])


def test_list_items_are_named_without_stray_quotes():
    from distalign.config.online import OnlineConfig
    with pytest.raises(ConfigError) as caught:
        load_config(OnlineConfig, None, ["method=grpo", "model.name_or_path=m", "data.train=d",
                                         "rewards=[{kind: regex, pattern: x}, {kind: bogus}]"])
    assert "field 'rewards[1].kind': must be one of" in str(caught.value)
    assert str(caught.value).startswith("command line: ")


def test_mixed_precision_no_as_accelerate_spells_it(tmp_path):
    """YAML 1.1 reads `no` (accelerate's spelling) as False; the field still means "no"; `yes` stays refused."""
    path = write(tmp_path, "method: dpo\nmodel: {name_or_path: m}\ndata: {train: d.jsonl}\ntrain: {mixed_precision: no}\n")
    assert load_config(OfflineConfig, path).train.mixed_precision == "no"
    assert load_config(OfflineConfig, None, [*BASE, "train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="field 'train.mixed_precision': expected str, got bool True"):
        load_config(OfflineConfig, None, [*BASE, "train.mixed_precision=yes"])
