"""Options every method shares: one `train.*` shape, report_to (tensorboard / wandb / none), LoRA's merged
save and trainable-parameter count, and TRL's implicit-prompt preference rows."""
import json

import pytest
import torch
from conftest import offline_overrides

from distalign.cli.main import main, method_families
from distalign.config import ConfigError, OfflineConfig, load_config

SHAPE = ["train.max_steps=7", "train.output_dir=runs/x", "train.seed=3"]


@pytest.mark.parametrize("method", [m for methods, _, _ in method_families() for m in methods])
def test_every_method_takes_the_same_train_shape(method):
    schema = next(s for methods, s, _ in method_families() if method in methods)
    cfg = load_config(schema, None, [f"method={method}", *needs(method), *SHAPE])
    assert (cfg.train.max_steps, cfg.train.output_dir, cfg.train.seed) == (7, "runs/x", 3)


def needs(method: str) -> list[str]:
    """The inputs `method` requires (and reads: the configs refuse any other)."""
    from distalign.config.online_pairwise import NEEDS_DEMOS, NEEDS_PAIRS, NEEDS_SCORES, ONLINE_PAIRWISE_METHODS
    if method == "nash_md":
        return []  # the tabular problem is defined by the config itself
    rewards = "rewards=[{kind: regex, pattern: a}]"
    fields = ["model.name_or_path=m"]
    if method in ONLINE_PAIRWISE_METHODS:
        fields += ["data.train=d.jsonl", rewards] if method in NEEDS_SCORES else []
        fields += ["pairs=p.jsonl"] if method in NEEDS_PAIRS else []
        return fields + (["demonstrations=d.jsonl"] if method in NEEDS_DEMOS else [])
    if method in ("irl", "aihf"):
        return fields + ["demonstrations=d.jsonl"] + (["pairs=p.jsonl"] if method == "aihf" else [])
    if method in ("ppo", "reinforce", "rloo", "grpo", "reverse_kl"):
        return fields + ["data.train=d.jsonl", rewards]
    return fields + ["data.train=d.jsonl"]


@pytest.mark.parametrize("method, field", [("spin", "train.epochs=2"), ("irl", "train.batch_size=4"),
                                           ("grpo", "train.eval_every=5"), ("online_dpo", "train.eval_every=5"),
                                           ("rebel", "train.gradient_accumulation_steps=2"),
                                           ("spac", "train.resume_allow=[max_steps]"),
                                           ("aihf", "train.save_merged=true"), ("irl", "train.log_every=2"),
                                           ("spin", "iteration.iterations=3"), ("irl", "iterations=3")])
def test_train_fields_a_method_does_not_use_are_refused(method, field):
    schema = next(s for methods, s, _ in method_families() if method in methods)
    length = ["train.max_steps=4"] if "iterations" in field else []  # train.max_steps sets the length instead
    with pytest.raises(ConfigError, match=f"field '{field.split('=')[0]}': has no effect for method {method}"):
        load_config(schema, None, [f"method={method}", *needs(method), *length, field])


def test_wandb_offline_gets_the_metrics(world_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(["train", "sft", *offline_overrides(world_dir, "sft", out, "train.max_steps=2",
                                                    "train.report_to=wandb")]) == 0
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run's record log
    assert len(runs) == 1 and runs[0].read_bytes().count(b"train/loss") >= 2  # a history record per step
    assert not (out / "tensorboard").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_report_to_none_and_missing_wandb(world_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "none"
    assert main(["train", "sft", *offline_overrides(world_dir, "sft", out, "train.max_steps=1",
                                                    "train.report_to=none")]) == 0
    assert not (out / "tensorboard").exists() and (out / "metrics.jsonl").is_file()
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    capsys.readouterr()
    code = main(["train", "sft", *offline_overrides(world_dir, "sft", tmp_path / "w", "train.report_to=wandb")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distalign: error:")]
    assert code == 2 and len(err) == 1 and "field 'train.report_to': wandb is not installed" in err[0]


def test_lora_saves_a_merged_model_and_reports_its_trainable_share(world_dir, tmp_path):
    from distalign.models import load_policy
    from distalign.training.offline import OfflineTrainer
    lines = []
    cfg = load_config(OfflineConfig, None, offline_overrides(world_dir, "dpo", tmp_path / "lora", "train.max_steps=2",
                                                             "model.lora.r=4", "train.save_merged=true",
                                                             "train.report_to=none"))
    OfflineTrainer(cfg, log=lines.append).train()
    counted = [line for line in lines if line.startswith("trainable parameters: ")]
    assert len(counted) == 1 and "%" in counted[0]
    trainable, total = (int(x.replace(",", "")) for x in counted[0].split(": ")[1].split(" (")[0].split(" of "))
    assert 0 < trainable < total / 5
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()
    merged = tmp_path / "lora" / "final-merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        adapter = load_policy(str(tmp_path / "lora" / "final")).eval()(ids).logits
        full = load_policy(str(merged)).eval()(ids).logits
    torch.testing.assert_close(adapter, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="field 'train.save_merged': has no effect for method dpo: only a LoRA"):
        load_config(OfflineConfig, None, offline_overrides(world_dir, "dpo", tmp_path / "x", "train.save_merged=true"))


def implicit_rows(explicit: list[dict]) -> list[dict]:
    """TRL's implicit-prompt form of explicit chat rows: whole conversations, no prompt field."""
    return [{"chosen": [*r["prompt"], {"role": "assistant", "content": r["chosen"]}],
             "rejected": [*r["prompt"], {"role": "assistant", "content": r["rejected"]}]} for r in explicit]


def test_implicit_prompt_pairs_read_as_the_explicit_ones(tmp_path):
    from distalign.data import load_examples
    explicit = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"}],
                 "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    for name, rows in (("explicit", explicit), ("implicit", implicit_rows(explicit))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, _ = load_examples(str(tmp_path / "explicit.jsonl"), "pairs")
    b, _ = load_examples(str(tmp_path / "implicit.jsonl"), "pairs")
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in a] == \
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in b]
    assert b[0]["prompt"] == explicit[0]["prompt"] and b[0]["chosen"] == "yes 0"


def test_implicit_prompt_without_a_shared_prefix_is_one_line_naming_the_row(world_dir, tmp_path, capsys):
    rows = [{"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "b"}]},
            {"chosen": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "C?"}, {"role": "assistant", "content": "b"}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", "dpo", *offline_overrides(world_dir, "dpo", out, f"data.train={path}")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distalign: error:")]
    assert code == 2 and len(err) == 1
    assert f"{path}: row 2: field 'chosen': expected 'chosen' and 'rejected' conversations that open" in err[0]
    assert not out.exists()
