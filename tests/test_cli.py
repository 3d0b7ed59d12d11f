"""The command line as a user runs it: subprocesses, exit codes, one-line errors."""
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import offline_overrides

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "distalign", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "train", "make-tiny", "testbed", "eval"):
        assert command in out.stdout


def test_make_tiny_and_train_from_example_config(world_dir, tmp_path):
    tiny = run("make-tiny", "--out", tmp_path / "m", "--arch", "qwen2", "--hidden-size", "32", "--vocab-size", "300")
    assert tiny.returncode == 0, tiny.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    out = run("train", "dpo", "--config", ROOT / "configs" / "dpo.yaml",
              *offline_overrides(world_dir, "dpo", tmp_path / "run", "train.max_steps=2", "data.eval=null",
                                "train.eval_every=0")[1:])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_train_nash_md_pg_from_example_config(world_dir, tmp_path):
    """The LM Nash-MD-PG runs from its example config through the CLI (the tabular nash_md has its own)."""
    out = run("train", "nash_md_pg", "--config", ROOT / "configs" / "nash_md_pg.yaml",
              f"model.name_or_path={world_dir / 'tiny'}",
              f"data.train={world_dir / 'data' / 'prompts.jsonl'}",
              "rewards=[{kind: regex, pattern: 'ka'}]", f"train.output_dir={tmp_path / 'run'}",
              "train.max_steps=2", "train.batch_size=2", "generation.max_new_tokens=4",
              "train.progress_bar=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "train/preference_vs_opponent" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_every_example_config_validates():
    from distalign.config import OfflineConfig, load_config
    from distalign.config.irl import IRL_METHODS, IRLConfig
    from distalign.config.online import ONLINE_METHODS, OnlineConfig
    from distalign.config.online_pairwise import NashConfig, ONLINE_PAIRWISE_METHODS, OnlinePairwiseConfig
    from distalign.objectives import PAIRWISE_OBJECTIVES
    checked = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.stem == "eval":  # an evaluation config (distalign eval), checked by its own test
            continue
        stem = path.stem  # a method's name, or METHOD_VARIANT (e.g. dpo_1p5b_lora) for a variant of its config
        declared = yaml.safe_load(path.read_text()).get("method", "")
        if declared and stem.startswith(f"{declared}_") and stem not in (*PAIRWISE_OBJECTIVES, *ONLINE_METHODS,
                                                                         *ONLINE_PAIRWISE_METHODS, *IRL_METHODS):
            stem = declared
        if stem in ("sft", "reward", *PAIRWISE_OBJECTIVES):
            cfg = load_config(OfflineConfig, path)
        elif stem in ONLINE_METHODS:
            cfg = load_config(OnlineConfig, path)
        elif stem == "nash_md":
            cfg = load_config(NashConfig, path)
        elif stem == "mixed_feedback":
            from distalign.config.testbed import MixedFeedbackConfig
            cfg = load_config(MixedFeedbackConfig, path)
        elif stem == "real_lm":
            from distalign.config.testbed import RealLMConfig
            cfg = load_config(RealLMConfig, path)
        elif stem in ONLINE_PAIRWISE_METHODS:
            cfg = load_config(OnlinePairwiseConfig, path)
        elif stem in IRL_METHODS:
            cfg = load_config(IRLConfig, path)
        else:
            raise AssertionError(f"{path.name}: no method family")
        assert cfg.method == stem
        for data in (getattr(getattr(cfg, "data", None), "train", ""), getattr(cfg, "pairs", ""),
                     getattr(cfg, "demonstrations", "")):
            assert not data or (ROOT / data).is_file(), f"{path.name}: {data} is not in the repository"
        checked += 1
    assert checked >= 25


def one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.startswith("distalign: error:")]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_config_key_is_one_line(world_dir, tmp_path):
    out = run("train", "dpo", *offline_overrides(world_dir, "dpo", tmp_path / "r")[1:], "optim.lr=1")
    one_line_error(out, "unknown key 'optim.lr'", "learning_rate")


def test_nonexistent_model_path_is_one_line(world_dir, tmp_path):
    out = run("train", "dpo", *offline_overrides(world_dir, "dpo", tmp_path / "r")[1:],
              f"model.name_or_path={tmp_path / 'no-such-model'}")
    one_line_error(out, "no-such-model")


def test_missing_data_file_is_one_line(world_dir, tmp_path):
    out = run("train", "sft", *offline_overrides(world_dir, "sft", tmp_path / "r")[1:],
              f"data.train={tmp_path / 'missing.jsonl'}")
    one_line_error(out, "missing.jsonl")


def test_bad_data_row_names_file_row_field(world_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": ""}\n')
    out = run("train", "dpo", *offline_overrides(world_dir, "dpo", tmp_path / "r")[1:], f"data.train={bad}")
    one_line_error(out, "bad.jsonl", "row 2")


def test_unknown_method_lists_valid_ones():
    out = run("train", "dpoo")
    one_line_error(out, "unknown method 'dpoo'", "valid:", "dpo")


def test_eval_command_writes_report(world_dir, tmp_path):
    """`distalign eval --config` end to end on the shared tiny world: policy vs reference, RM metrics."""
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"policies: {{tiny: {world_dir / 'tiny'}}}\nreference: {world_dir / 'tiny'}\n"
        f"prompts: {world_dir / 'data' / 'prompts.jsonl'}\nmax_prompts: 8\n"
        "generation: {max_new_tokens: 4, temperature: 1.0, seed: 0, batch_size: 8}\n"
        f"output_dir: {tmp_path / 'out'}\n")
    out = run("eval", "--config", config)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "eval.md").is_file() and (tmp_path / "out" / "eval.json").is_file()
    assert "| tiny |" in out.stdout   # the results table is printed
    bad = run("eval", "--config", config, "policiez=1")
    one_line_error(bad, "command line: unknown key 'policiez'")


def test_version_and_help_texts(capsys):
    import pytest

    from distalign import __version__
    from distalign.cli.main import main
    for argv, expected in ((["--version"], f"distalign {__version__}"),
                           (["testbed", "--help"], "mixed-feedback"),
                           (["eval", "--help"], "judge.max_concurrency"),
                           (["train", "--help"], "nash_md_pg"),
                           (["--help"], "exit codes")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0 and expected in capsys.readouterr().out, argv
    assert main(["train", "cpo", "--list-fields"]) == 0
    fields = capsys.readouterr().out
    assert "loss.tau" in fields and "[range: (0, inf)]" in fields and "[choices: full, simple, clip]" in fields
    assert "train.max_steps" in fields and "[range: [0, inf)]" in fields


def test_an_internal_error_exits_1_with_the_traceback_and_a_bug_line(monkeypatch, capsys):
    from distalign.cli import main as cli

    def broken(args):
        raise KeyError("boom")   # not a user error: a bug

    monkeypatch.setattr(cli, "cmd_demo", broken)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error: KeyError" in err and "This is a bug in distalign" in err


def test_only_the_main_process_prints(monkeypatch, capsys):
    from distalign.cli.main import main
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # set by main() on other processes
    assert main(["train", "dpo", "--list-fields"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("DISTALIGN_ALL_PROCESSES_PRINT", "1")
    assert main(["train", "dpo", "--list-fields"]) == 0
    assert "loss.beta" in capsys.readouterr().out


def test_list_fields_names_what_cpo_is_and_its_loss_keys():
    out = run("train", "cpo", "--list-fields")
    assert out.returncode == 0, out.stderr
    assert "Constrained Preference Optimization" in out.stdout and "not TRL's CPOTrainer" in out.stdout
    assert all(f"loss.{key}" in out.stdout for key in ("beta", "alpha", "tau", "margin", "variant"))
