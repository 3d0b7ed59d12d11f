"""Bad input of every kind, as a user gives it to the command line: config values (file and command
line), data files, reward plugins, testbed and eval configs, the judge.

Each case asserts exit code 2, exactly one line `distalign: error: ...` that names the field (and the
file, "command line", or the row), no traceback, and that nothing already saved changed: an earlier
run's folder (checkpoint, final model, metrics, config) is byte-identical afterwards. Cases that fail
while loading the config run into that folder itself; cases that fail later (data files, a reward
function that breaks mid-run) run into a fresh folder beside it, which must then hold no checkpoint
and no final model. Most cases are one in-process `main()` call (a subprocess costs seconds of
imports); `test_the_installed_cli_exits_2` runs a few through `python -m distalign`.
Checkpoints and run folders (bad resumes, reused folders, damaged checkpoints) have their cases in
tests/test_resume_contract.py, non-finite runs in tests/test_nonfinite.py, under the same assertions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distalign.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def paths(world_dir, tmp_path, monkeypatch):
    """{placeholders} of the cases, an earlier run's folder `saved`, and a plugin folder on sys.path."""
    saved = tmp_path / "saved"
    (saved / "checkpoint-1").mkdir(parents=True)
    (saved / "checkpoint-1" / "model.safetensors").write_bytes(os.urandom(256))
    (saved / "checkpoint-1" / "state.json").write_text('{"step": 1}')
    (saved / "final").mkdir()
    (saved / "final" / "model.safetensors").write_bytes(os.urandom(256))
    (saved / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.69}\n')
    (saved / "config.yaml").write_text("method: dpo\n")
    (saved / "eval.json").write_text('{"results": {}}\n')
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name, body in PLUGINS.items():
        (plugins / f"{name}_{tmp_path.name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(plugins))
    data = world_dir / "data"
    return {"tiny": world_dir / "tiny", "pairs": data / "pairs.jsonl", "demos": data / "demonstrations.jsonl",
            "prompts": data / "prompts.jsonl", "saved": saved, "new": tmp_path / "new", "tmp": tmp_path,
            "suffix": tmp_path.name}


PLUGINS = {
    "raises": "def reward(prompts, completions, **_):\n    return [{}['answer'] for _ in completions]\n",
    "returns_none": "def reward(prompts, completions, **_):\n    pass\n",
    "too_few": "def reward(prompts, completions, **_):\n    return [1.0]\n",
    "nan": "def reward(prompts, completions, **_):\n    return [float('nan')] * len(completions)\n",
    "broken": "def reward(prompts, completions, **_):\n    return [1.0 for c in completions\n",
    "no_function": "def other(prompts, completions, **_):\n    return [1.0] * len(completions)\n",
    "numpy_ok": "import numpy as np\ndef reward(prompts, completions, **_):\n"
                "    return [np.float32(len(c) % 3) for c in completions]\n",
    "judge_raises": "def judge(prompts, a, b):\n    raise RuntimeError('judge offline')\n",
    "judge_not_probability": "def judge(prompts, a, b):\n    return [2.0] * len(a)\n",
    "judge_too_few": "def judge(prompts, a, b):\n    return [0.5]\n",
}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fill(args, paths) -> list[str]:
    return [str(a).format(**paths) for a in args]


def run_main(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("distalign: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


DPO = ["train", "dpo", "model.name_or_path={tiny}", "data.train={pairs}", "train.output_dir={saved}",
       "train.max_steps=1", "train.progress_bar=false"]
GRPO = ["train", "grpo", "model.name_or_path={tiny}", "data.train={prompts}", "train.output_dir={saved}",
        "train.max_steps=1", "train.batch_size=2", "generation.max_new_tokens=3", "generation.num_samples=2",
        "train.progress_bar=false", "rewards=[{{kind: regex, pattern: a}}]"]
SPIN = ["train", "spin", "model.name_or_path={tiny}", "demonstrations={demos}", "train.output_dir={saved}"]
IRL = ["train", "irl", "model.name_or_path={tiny}", "demonstrations={demos}", "train.output_dir={saved}"]
CL = "command line"

# (id, argv, fragments of the error line): values from key=value overrides, failing at config load.
OVERRIDE_CASES = [
    ("max_steps_negative", [*DPO, "train.max_steps=-5"], [CL, "'train.max_steps'", ">= 0"]),
    ("epochs_zero", [*DPO, "train.max_steps=0", "train.epochs=0"], [CL, "'train.epochs'"]),
    ("epochs_negative", [*DPO, "train.max_steps=0", "train.epochs=-1"], [CL, "'train.epochs'"]),
    ("warmup_negative", [*DPO, "optim.warmup_steps=-3"], [CL, "'optim.warmup_steps'"]),
    ("save_every_negative", [*DPO, "train.save_every=-1"], [CL, "'train.save_every'"]),
    ("max_grad_norm_negative", [*DPO, "optim.max_grad_norm=-1"], [CL, "'optim.max_grad_norm'"]),
    ("beta_negative", [*DPO, "loss.beta=-1"], [CL, "'loss.beta'", "> 0"]),
    ("beta_zero", [*DPO, "loss.beta=0"], [CL, "'loss.beta'"]),
    ("beta_not_a_number", [*DPO, "loss.beta=abc"], [CL, "'loss.beta'", "expected float"]),
    ("log_every_zero", [*DPO, "train.log_every=0"], [CL, "'train.log_every'", ">= 1"]),
    ("learning_rate_negative", [*DPO, "optim.learning_rate=-1e-5"], [CL, "'optim.learning_rate'"]),
    ("adam_beta1_two", [*DPO, "optim.adam_beta1=2"], [CL, "'optim.adam_beta1'", "[0, 1)"]),
    ("adam_beta2_one", [*DPO, "optim.adam_beta2=1"], [CL, "'optim.adam_beta2'"]),
    ("adam_eps_zero", [*DPO, "optim.adam_eps=0"], [CL, "'optim.adam_eps'"]),
    ("weight_decay_negative", [*DPO, "optim.weight_decay=-0.1"], [CL, "'optim.weight_decay'"]),
    ("lora_r_zero", [*DPO, "model.lora.r=0"], [CL, "'model.lora.r'"]),
    ("lora_dropout_above_one", [*DPO, "model.lora.dropout=1.5"], [CL, "'model.lora.dropout'"]),
    ("batch_size_zero", [*DPO, "train.batch_size=0"], [CL, "'train.batch_size'"]),
    ("accumulation_zero", [*DPO, "train.gradient_accumulation_steps=0"], [CL, "'train.gradient_accumulation_steps'"]),
    ("seed_negative", [*DPO, "train.seed=-1"], [CL, "'train.seed'"]),
    ("max_length_zero", [*DPO, "data.max_length=0"], [CL, "'data.max_length'"]),
    ("eval_every_negative", [*DPO, "train.eval_every=-2"], [CL, "'train.eval_every'"]),
    ("keep_checkpoints_negative", [*DPO, "train.keep_checkpoints=-1"], [CL, "'train.keep_checkpoints'"]),
    ("max_steps_float", [*DPO, "train.max_steps=1.5"], [CL, "'train.max_steps'", "expected int"]),
    ("learning_rate_word", [*DPO, "optim.learning_rate=fast"], [CL, "'optim.learning_rate'", "expected float"]),
    ("mixed_precision_choice", [*DPO, "train.mixed_precision=fp8"], [CL, "'train.mixed_precision'", "one of"]),
    ("unknown_optim_key", [*DPO, "optim.lr=1"], [CL, "unknown key 'optim.lr'", "learning_rate"]),
    ("unknown_loss_key", [*DPO, "loss.bta=0.1"], [CL, "unknown key 'loss.bta'", "beta"]),
    ("override_without_value", [*DPO, "train.max_steps="], [CL, "'train.max_steps'"]),
    ("robust_dpo_epsilon", [*DPO[:1], "robust_dpo", *DPO[2:], "loss.epsilon=0.7"], [CL, "'loss.epsilon'", "[0, 0.5)"]),
    ("cpo_variant", [*DPO[:1], "cpo", *DPO[2:], "loss.variant=bogus"], [CL, "'loss.variant'", "'clip'"]),
    ("reward_margin", [*DPO[:1], "reward", *DPO[2:], "loss.margin=-1"], [CL, "'loss.margin'"]),
    ("sft_takes_no_loss", ["train", "sft", "model.name_or_path={tiny}", "data.train={demos}",
                           "train.output_dir={saved}", "loss.beta=0.1"], [CL, "unknown key 'loss.beta'"]),
    ("grpo_temperature_zero", [*GRPO, "generation.temperature=0"], [CL, "'generation.temperature'"]),
    ("grpo_top_p_zero", [*GRPO, "generation.top_p=0"], [CL, "'generation.top_p'"]),
    ("grpo_num_samples_zero", [*GRPO, "generation.num_samples=0"], [CL, "'generation.num_samples'"]),
    ("grpo_clip_negative", [*GRPO, "loss.clip_eps=-0.2"], [CL, "'loss.clip_eps'"]),
    ("grpo_length_norm", [*GRPO, "loss.length_norm=bogus"], [CL, "'loss.length_norm'", "one of"]),
    ("grpo_kl_negative", [*GRPO, "loss.kl_coef=-0.1"], [CL, "'loss.kl_coef'"]),
    ("reward_kind", [*GRPO, "rewards=[{{kind: bogus}}]"], [CL, "'rewards[0].kind'", "one of"]),
    ("reward_regex_pattern", [*GRPO, "rewards=[{{kind: regex}}]"], [CL, "'rewards[0].pattern'"]),
    ("reward_weight_nan", [*GRPO, "rewards=[{{kind: regex, pattern: a, weight: .nan}}]"],
     [CL, "'rewards[0].weight'"]),
    ("reward_module_missing", [*GRPO, "rewards=[{{kind: callable, path: 'no_such_module_x:reward'}}]"],
     [CL, "'rewards[0].path'", "no_such_module_x"]),
    ("reward_syntax_error", [*GRPO, "rewards=[{{kind: callable, path: 'broken_{suffix}:reward'}}]"],
     [CL, "'rewards[0].path'", "syntax error in", "broken_", ".py, line 2"]),
    ("reward_function_missing", [*GRPO, "rewards=[{{kind: callable, path: 'no_function_{suffix}:reward'}}]"],
     [CL, "'rewards[0].path'", "no callable 'reward'"]),
    ("nash_md_pg_mixture", ["train", "nash_md_pg", "model.name_or_path={tiny}", "data.train={prompts}",
                            "train.output_dir={saved}", "rewards=[{{kind: regex, pattern: a}}]", "loss.mixture=1.5"],
     [CL, "'loss.mixture'", "[0, 1]"]),
    ("spin_beta_negative", [*SPIN, "loss.beta=-1"], [CL, "'loss.beta'"]),
    ("spin_iterations_zero", [*SPIN, "iteration.iterations=0"], [CL, "'iteration.iterations'"]),
    ("irl_reward_learning_rate", [*IRL, "reward.learning_rate=0"], [CL, "'reward.learning_rate'"]),
    ("irl_rl_steps", [*IRL, "rl.steps=0"], [CL, "'rl.steps'"]),
    ("nash_md_eta", ["train", "nash_md", "train.output_dir={saved}", "eta=0"], [CL, "'eta'"]),
    ("unknown_method", ["train", "dpoo", "model.name_or_path={tiny}"], [CL, "unknown method 'dpoo'", "valid:"]),
    ("testbed_unknown_experiment", ["testbed", "no-such", "--out", "{saved}"], [CL, "unknown experiment"]),
    ("testbed_config_not_configurable", ["testbed", "rate", "--out", "{saved}", "--config", "{tmp}/x.yaml"],
     [CL, "--config"]),
]


@pytest.mark.parametrize("case, argv, fragments", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_override_values(paths, capsys, case, argv, fragments):
    before = snapshot(paths["saved"])
    code, err = run_main(fill(argv, paths), capsys)
    assert_one_line_error(code, err, fill(fragments, paths))
    assert snapshot(paths["saved"]) == before


# (id, YAML text, extra overrides, fragments): values from a config file; "{file}" is its path.
FILE_CASES = [
    ("file_max_steps", "train: {{max_steps: -5}}\n", [], ["{file}: field 'train.max_steps'"]),
    ("file_beta_string", "loss: {{beta: abc}}\n", [], ["{file}: field 'loss.beta'"]),
    ("file_unknown_key", "trian: {{max_steps: 1}}\n", [], ["{file}: unknown key 'trian'"]),
    ("file_not_yaml", "train: {{max_steps: [1\n", [], ["{file}: not valid YAML at line"]),
    ("file_top_level_list", "- 1\n- 2\n", [], ["{file}: top level must be a mapping"]),
    ("file_lora_r", "model: {{name_or_path: '{tiny}', lora: {{r: 0}}}}\n", [], ["{file}: field 'model.lora.r'"]),
    # the file is fine; the override is not, and the error says so
    ("file_ok_override_bad", "train: {{max_steps: 2}}\n", ["train.max_steps=-1"],
     ["command line: field 'train.max_steps'"]),
    ("file_bad_override_fixes_other", "optim: {{warmup_steps: -3}}\n", ["train.max_steps=2"],
     ["{file}: field 'optim.warmup_steps'"]),
]


@pytest.mark.parametrize("case, text, extra, fragments", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_files(paths, capsys, case, text, extra, fragments):
    config = paths["tmp"] / "run.yaml"
    config.write_text(text.format(**paths))
    before = snapshot(paths["saved"])
    argv = fill(["train", "dpo", "--config", config, *[a for a in DPO[2:] if "max_steps" not in a], *extra], paths)
    code, err = run_main(argv, capsys)
    assert_one_line_error(code, err, [f.format(file=config, **paths) for f in fragments])
    assert snapshot(paths["saved"]) == before


def test_missing_config_file(paths, capsys):
    code, err = run_main(fill(["train", "dpo", "--config", "{tmp}/nope.yaml"], paths), capsys)
    assert_one_line_error(code, err, [f"{paths['tmp']}/nope.yaml: config file not found"])


def test_testbed_config_value_names_the_file(paths, capsys):
    config = paths["tmp"] / "mf.yaml"
    config.write_text("methods: [dpo]\nbeta: -1\n")
    code, err = run_main(fill(["testbed", "mixed-feedback", "--out", "{saved}", "--config", config], paths), capsys)
    assert_one_line_error(code, err, [f"{config}: field 'beta'", "> 0"])


# (id, file name, text, method, data key, fragments): data files, failing after the tokenizer loads.
DATA_CASES = [
    ("data_missing", None, None, "dpo", "data.train", ["missing.jsonl"]),
    ("data_empty_chosen", "bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": ""}\n',
     "dpo", "data.train", ["bad.jsonl", "row 2", "chosen"]),
    ("data_not_json", "bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n',
     "dpo", "data.train", ["bad.jsonl", "line 2", "invalid JSON"]),
    ("data_no_prompt", "bad.jsonl", '{"question": "a"}\n', "grpo", "data.train", ["bad.jsonl", "row 1", "prompt"]),
    ("data_sft_no_completion", "bad.jsonl", '{"prompt": "a"}\n', "sft", "data.train", ["bad.jsonl", "row 1"]),
]


@pytest.mark.parametrize("case, name, text, method, key, fragments", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(paths, capsys, case, name, text, method, key, fragments):
    data = paths["tmp"] / (name or "missing.jsonl")
    if text is not None:
        data.write_text(text)
    base = GRPO if method == "grpo" else [DPO[0], method, *DPO[2:]]
    before = snapshot(paths["saved"])
    argv = fill([*base, "train.output_dir={new}"], paths) + [f"{key}={data}"]
    code, err = run_main(argv, capsys)
    assert_one_line_error(code, err, fragments)
    assert snapshot(paths["saved"]) == before
    assert not list(paths["new"].glob("checkpoint-*")) and not (paths["new"] / "final").exists()


# A reward function that breaks once training runs: named with its module and the sample.
PLUGIN_CASES = [
    ("plugin_raises", "raises", ["reward function raises_", ":reward raised KeyError", "on sample 0"]),
    ("plugin_returns_none", "returns_none", ["reward function returns_none_", "returned NoneType"]),
    ("plugin_too_few_values", "too_few", ["reward function too_few_", "returned 1 values for 4"]),
    ("plugin_nan", "nan", ["reward function nan_", "value 0 is nan"]),
]


@pytest.mark.parametrize("case, module, fragments", PLUGIN_CASES, ids=[c[0] for c in PLUGIN_CASES])
def test_reward_plugin_failures_mid_run(paths, capsys, case, module, fragments):
    before = snapshot(paths["saved"])
    argv = fill([*GRPO, "train.output_dir={new}", f"rewards=[{{{{kind: callable, path: '{module}_{{suffix}}:reward'}}}}]"],
                paths)
    code, err = run_main(argv, capsys)
    assert_one_line_error(code, err, fragments)
    assert snapshot(paths["saved"]) == before
    assert not list(paths["new"].glob("checkpoint-*")) and not (paths["new"] / "final").exists()


# A pairwise judge (online_dpo's `judge:`) that breaks once training runs: named like a reward function.
JUDGE_CASES = [
    ("judge_raises", ["judge judge_raises_", ":judge raised RuntimeError: judge offline", "batch of 2 pairs"]),
    ("judge_not_probability", ["judge judge_not_probability_", "value 0 is 2.0", "in [0, 1]"]),
    ("judge_too_few", ["judge judge_too_few_", "returned 1 values for 2 pairs"]),
]


@pytest.mark.parametrize("module, fragments", JUDGE_CASES, ids=[c[0] for c in JUDGE_CASES])
def test_judge_failures_mid_run(paths, capsys, module, fragments):
    before = snapshot(paths["saved"])
    argv = fill(["train", "online_dpo", "model.name_or_path={tiny}", "data.train={prompts}",
                 "train.output_dir={new}", "train.max_steps=1", "train.batch_size=2", "generation.max_new_tokens=3",
                 "train.progress_bar=false", f"judge={module}_{{suffix}}:judge"], paths)
    code, err = run_main(argv, capsys)
    assert_one_line_error(code, err, fragments)
    assert snapshot(paths["saved"]) == before
    assert not list(paths["new"].glob("checkpoint-*")) and not (paths["new"] / "final").exists()


def test_numpy_scalar_rewards_are_accepted(paths, capsys):
    argv = fill([*GRPO, "train.output_dir={new}", "rewards=[{{kind: callable, path: 'numpy_ok_{suffix}:reward'}}]"],
                paths)
    assert main(argv) == 0, capsys.readouterr().err
    assert (paths["new"] / "final").is_dir()


# ---- distalign eval ----------------------------------------------------------------------------------
def eval_config(paths, **extra) -> Path:
    config = {"policies": {"tiny": str(paths["tiny"])}, "reference": str(paths["tiny"]),
              "prompts": str(paths["prompts"]), "max_prompts": 2,
              "generation": {"max_new_tokens": 2, "batch_size": 2}, "output_dir": str(paths["saved"]), **extra}
    path = paths["tmp"] / "eval.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


EVAL_CASES = [
    ("eval_temperature_zero", {"generation": {"temperature": 0}}, [], ["{file}: field 'generation.temperature'"]),
    ("eval_max_prompts_zero", {}, ["max_prompts=0"], ["command line: field 'max_prompts'"]),
    ("eval_unknown_key", {"policiez": 1}, [], ["{file}: unknown key 'policiez'"]),
    ("eval_judge_concurrency", {"judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_concurrency": 0}},
     [], ["{file}: field 'judge.max_concurrency'"]),
    ("eval_judge_missing_model", {"judge": {"base_url": "http://127.0.0.1:9/v1"}}, [], ["field 'judge.model'"]),
    ("eval_mtbench_without_judge", {"mtbench": True}, [], ["field 'mtbench'"]),
    ("eval_prompts_missing", {"prompts": "/nonexistent/prompts.jsonl"}, [], ["prompts.jsonl"]),
    ("eval_harness_limit", {}, ["harness.limit=-1"], ["command line: field 'harness.limit'"]),
    # the key check happens before any model loads: the policy path does not exist, and it is not reached
    ("eval_key_unset", {"policies": {"x": "/nonexistent/model"},
                        "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                  "api_key_env": "DISTALIGN_TEST_UNSET_KEY"}},
     [], ["judge.api_key_env", "DISTALIGN_TEST_UNSET_KEY", "is not set"]),
]


@pytest.mark.parametrize("case, extra, overrides, fragments", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_eval_configs(paths, capsys, case, extra, overrides, fragments, monkeypatch):
    monkeypatch.delenv("DISTALIGN_TEST_UNSET_KEY", raising=False)
    config = eval_config(paths, **extra)
    before = snapshot(paths["saved"])
    code, err = run_main(["eval", "--config", str(config), *overrides], capsys)
    assert_one_line_error(code, err, [f.format(file=config) for f in fragments])
    assert snapshot(paths["saved"]) == before


def test_an_api_key_pasted_into_api_key_env_is_not_echoed(paths, capsys):
    secret = "sk-proj-Zx81kLmN0pQrSt55uvWX"
    config = eval_config(paths, judge={"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": secret})
    before = snapshot(paths["saved"])
    code, err = run_main(["eval", "--config", str(config)], capsys)
    assert_one_line_error(code, err, ["field 'judge.api_key_env'", "expected the NAME"])
    assert secret not in err and snapshot(paths["saved"]) == before


def test_a_failing_judge_keeps_the_other_results(paths, capsys, monkeypatch):
    """The endpoint refuses connections: KL is written, the judge cells read "failed", exit 2."""
    monkeypatch.setenv("DISTALIGN_TEST_JUDGE_KEY", "x")
    out = paths["new"]
    config = eval_config(paths, output_dir=str(out), prompts=str(paths["tmp"] / "with_refs.jsonl"),
                         judge={"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0,
                                "api_key_env": "DISTALIGN_TEST_JUDGE_KEY"})
    (paths["tmp"] / "with_refs.jsonl").write_text('{"prompt": "ka", "reference": "ko"}\n' * 2)
    code = main(["eval", "--config", str(config)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, ["the judge failed", "127.0.0.1:9"])
    report = json.loads((out / "eval.json").read_text())
    row = report["results"]["tiny"]
    assert row["judge_win_rate"] == "failed" and row["kl"]["n"] == 2 and report["judge_error"]
    assert "| tiny |" in captured.out  # the table is printed on stdout


@pytest.mark.parametrize("argv, fragment", [
    (["train", "dpoo"], "unknown method 'dpoo'"),
    (["train", "dpo", "model.name_or_path=m", "data.train=d", "train.max_steps=-5"],
     "command line: field 'train.max_steps': must be >= 0, got -5"),
    (["testbed", "nope", "--out", "x"], "unknown experiment 'nope'"),
])
def test_the_installed_cli_exits_2(argv, fragment, tmp_path):
    out = subprocess.run([sys.executable, "-m", "distalign", *argv], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert_one_line_error(out.returncode, out.stderr, [fragment])
