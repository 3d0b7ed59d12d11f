"""Evaluation metrics, win-rates and reports: hand-derived values and fp64 references on a tiny Llama."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from distalign.evaluation import (
    kl_to_reference,
    markdown_table,
    mean_stderr,
    oracle_winrate,
    response_logps,
    reward_scores,
    reward_winrate,
    rm_accuracy,
    sample_responses,
    winrate_from_outcomes,
    write_report,
)

WORDS = ["<pad>", "<eos>", "<unk>", "the", "cat", "dog", "sat", "ran", "on", "mat", "a", "big", "red"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def padded_tokenizer(tokenizer):
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       eos_token_id=1, bos_token_id=1, pad_token_id=None, **extra)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


PROMPTS = ["the cat", "a big red dog ran on the", "dog"]


# ---- pure statistics ------------------------------------------------------------------------------
def test_mean_stderr_by_hand():
    mean, stderr = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt((5 / 3) / 4))
    assert math.isnan(mean_stderr([3.0])[1]) and math.isnan(mean_stderr([])[0])


def test_kl_to_reference_by_hand():
    # l = [1, 0]: k1 mean 0.5, stderr sqrt(0.5 / 2) = 0.5; k3 = [e^-1, 0]: mean e^-1/2, stderr e^-1/2
    result = kl_to_reference(torch.tensor([0.0, -1.0]), torch.tensor([-1.0, -1.0]))
    assert result["kl"] == pytest.approx(0.5) and result["kl_stderr"] == pytest.approx(0.5)
    assert result["kl_k3"] == pytest.approx(math.exp(-1) / 2, rel=1e-6)
    assert result["kl_k3_stderr"] == pytest.approx(math.exp(-1) / 2, rel=1e-6) and result["n"] == 2
    with pytest.raises(ValueError, match="kl_to_reference"):
        kl_to_reference(torch.zeros(3), torch.zeros(2))


def test_kl_estimates_match_exact_kl_of_categoricals():
    pi, pi0 = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = float((pi * (pi / pi0).log()).sum())
    samples = torch.multinomial(pi, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    result = kl_to_reference(pi.log()[samples], pi0.log()[samples])
    assert abs(result["kl"] - exact) < 4 * result["kl_stderr"]
    assert abs(result["kl_k3"] - exact) < 4 * result["kl_k3_stderr"]


def test_rm_accuracy_ties_count_half():
    result = rm_accuracy([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 1.0])  # hits 1, .5, 0, 1
    assert result["accuracy"] == pytest.approx(0.625) and result["n"] == 4
    assert result["stderr"] == pytest.approx(math.sqrt((0.140625 * 2 + 0.015625 + 0.390625) / 3 / 4))


def test_oracle_winrate_is_mean_probability():
    probs = {("x", "a"): 0.9, ("y", "b"): 0.5, ("z", "c"): 0.1}
    result = oracle_winrate(["x", "y", "z"], ["a", "b", "c"], ["r", "r", "r"], lambda x, a, b: probs[(x, a)])
    assert result.rate == pytest.approx(0.5) and (result.wins, result.ties, result.losses) == (1, 1, 1)
    assert result.stderr == pytest.approx(math.sqrt(0.16 / 3))
    with pytest.raises(ValueError, match="pair 0: score 1.5"):
        oracle_winrate(["x"], ["a"], ["b"], lambda *args: 1.5)


def test_reward_winrate_higher_wins_equal_ties():
    reward = {"good": 2.0, "ok": 1.0, "bad": 0.0}
    fn = lambda prompts, responses: [reward[r] for r in responses]
    result = reward_winrate(["p"] * 3, ["good", "ok", "bad"], ["ok", "ok", "good"], fn)
    assert (result.wins, result.ties, result.losses, result.rate) == (1, 1, 1, 0.5)
    with pytest.raises(ValueError, match="2 prompts, 1 policy responses"):
        reward_winrate(["p", "q"], ["a"], ["b"], fn)


def test_winrate_from_outcomes_excludes_invalid():
    result = winrate_from_outcomes(["win", "win", "loss", "invalid"])
    assert result.rate == pytest.approx(2 / 3) and result.n == 3 and result.invalid == 1


# ---- tiny real models -------------------------------------------------------------------------------
def reference_logp64(model, prompt_ids, response_ids) -> float:
    """Unpadded fp64 forward of one sequence: sum of log-softmax over the response tokens."""
    model64 = LlamaForCausalLM(model.config).double()
    model64.load_state_dict(model.state_dict())
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model64(input_ids=ids).logits[0, :-1], dim=-1)
    targets = ids[0, 1:]
    return float(logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum())


def test_sample_responses_left_padding_and_logps(policy, tokenizer):
    one_by_one = sample_responses(policy, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.0, batch_size=1)
    batched = sample_responses(policy, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.0, batch_size=3)
    assert batched.responses_ids == one_by_one.responses_ids and batched.texts == one_by_one.texts
    assert batched.prompts_ids == [tokenizer(p)["input_ids"] for p in PROMPTS]
    for ids in batched.responses_ids:
        assert 1 <= len(ids) <= 6 and (1 not in ids[:-1])
    assert batched.n_without_eos == sum(ids[-1] != 1 for ids in batched.responses_ids)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None  # restored
    logps = response_logps(policy, batched.prompts_ids, batched.responses_ids, pad_token_id=0, batch_size=3)
    expected = [reference_logp64(policy, p, r) for p, r in zip(batched.prompts_ids, batched.responses_ids)]
    assert logps.dtype == torch.float32 and logps.tolist() == pytest.approx(expected, abs=1e-4)


def test_response_logps_scores_same_prompt_neighbours_in_one_row(policy, tokenizer):
    """Rows 0-1, 2-3 and 4-5 share their prompts, row 6 repeats row 5's but its partner is taken, rows 7-9
    share one prompt (a couple, then a single): every log-prob equals the unpadded fp64 forward of its own
    [prompt | response], whatever the batch size, and each couple is one row of a forward."""
    prompts = [p for p in PROMPTS for _ in range(2)] + ["dog"] + PROMPTS[:1] * 3
    samples = sample_responses(policy, tokenizer, prompts,
                               max_new_tokens=5, temperature=1.0, seed=3)
    expected = [reference_logp64(policy, p, r) for p, r in zip(samples.prompts_ids, samples.responses_ids)]
    forwards = []
    handle = policy.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                              with_kwargs=True)
    try:
        for batch_size in (1, 2, 5, 64):
            forwards.clear()
            logps = response_logps(policy, samples.prompts_ids, samples.responses_ids, pad_token_id=0,
                                   batch_size=batch_size)
            assert logps.dtype == torch.float32 and logps.tolist() == pytest.approx(expected, abs=1e-4), batch_size
            assert sum(forwards) == 4 + 2, batch_size        # four couples, two singles
    finally:
        handle.remove()


def test_sampling_is_seeded_and_leaves_caller_rng_alone(policy, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample_responses(policy, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = sample_responses(policy, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    assert first.responses_ids == again.responses_ids


def test_kl_of_policy_to_itself_is_zero(policy, tokenizer):
    samples = sample_responses(policy, tokenizer, PROMPTS, max_new_tokens=5, temperature=1.0, seed=1)
    logps = response_logps(policy, samples.prompts_ids, samples.responses_ids, pad_token_id=0)
    assert kl_to_reference(logps, logps)["kl"] == 0.0


def test_reward_scores_batched_equal_single(padded_tokenizer):
    tokenizer = padded_tokenizer
    torch.manual_seed(1)
    reward_model = LlamaForSequenceClassification(tiny_config(num_labels=1)).eval()
    prompts, responses = ["the cat ", "a ", "dog "], ["sat on the mat", "big red dog", "ran"]
    batched = reward_scores(reward_model, tokenizer, prompts, responses, batch_size=3)
    single = [reward_scores(reward_model, tokenizer, [p], [r], batch_size=1)[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)
    # formatted as the reward trainer formats pairs: prompt ids + response ids + EOS
    ids = torch.tensor([tokenizer("a")["input_ids"] + tokenizer("big red dog")["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        assert batched[1] == pytest.approx(float(reward_model(input_ids=ids).logits[0, 0]), abs=1e-5)


def test_reward_scores_need_a_pad_token(tokenizer):
    reward_model = LlamaForSequenceClassification(tiny_config(num_labels=1)).eval()
    with pytest.raises(ValueError, match="no pad token"):
        reward_scores(reward_model, tokenizer, ["a"], ["b"])


# ---- reports ---------------------------------------------------------------------------------------
def test_markdown_table_and_json(tmp_path):
    results = {"dpo": {"win_rate": {"rate": 0.625, "stderr": 0.0412, "n": 8}, "kl": {"kl": 1.5, "kl_stderr": 0.25},
                       "rm_score": {"mean": -0.1234, "stderr": math.nan}},
               "pmle": {"win_rate": {"rate": 0.5, "stderr": 0.05}, "note": "a|b"}}
    table = markdown_table(results)
    assert table.splitlines() == [
        "| model | win_rate | kl | rm_score | note |",
        "| --- | --- | --- | --- | --- |",
        "| dpo | 0.625 ± 0.041 | 1.500 ± 0.250 | -0.123 | – |",
        "| pmle | 0.500 ± 0.050 | – | – | a\\|b |"]
    json_path, md_path = write_report(results, tmp_path / "out", extra={"config": {"seed": 0}})
    loaded = json.loads(json_path.read_text())
    assert loaded["results"]["dpo"]["rm_score"]["stderr"] is None and loaded["config"] == {"seed": 0}
    assert md_path.read_text() == table


# ---- evaluate(config) end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_world(tmp_path_factory, tokenizer):
    """A saved reference, a policy, a reward model and data files in a temporary folder."""
    root = tmp_path_factory.mktemp("world")
    for name, seed in (("reference", 0), ("policy", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(tiny_config()).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    torch.manual_seed(2)
    LlamaForSequenceClassification(tiny_config(num_labels=1)).save_pretrained(root / "rm")
    prompts = [{"prompt": "the cat", "reference": "sat"}, {"prompt": "a dog", "reference": "ran on the mat"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    pairs = [{"prompt": "the ", "chosen": "cat sat", "rejected": "dog"}] * 3
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    return root


def test_evaluate_end_to_end_and_judge_cache_resume(saved_world, tmp_path, monkeypatch):
    from fake_judge_server import running_fake_judge

    from distalign.evaluation import evaluate

    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-e2e-secret")
    with running_fake_judge() as server:
        config = {"policies": {"ref": str(saved_world / "reference"), "pol": str(saved_world / "policy")},
                  "reference": str(saved_world / "reference"), "prompts": str(saved_world / "prompts.jsonl"),
                  "generation": {"max_new_tokens": 4, "batch_size": 2, "seed": 3},
                  "reward_model": str(saved_world / "rm"), "pairs": str(saved_world / "pairs.jsonl"),
                  "judge": {"base_url": server.base_url, "model": "fake", "api_key_env": "FAKE_JUDGE_KEY"},
                  "mtbench": True, "output_dir": str(tmp_path / "eval")}
        first = evaluate(config)
        asked = server.requests
        assert asked == first["judge_requests"] and 0 < asked <= 2 * 2 * 2 + 2 * 2
        second = evaluate(config)
        assert server.requests == asked and second["judge_requests"] == 0
    assert first["results"] == second["results"]
    ref_row, pol_row = first["results"]["ref"], first["results"]["pol"]
    assert ref_row["kl"]["kl"] == 0.0 and ref_row["kl"]["n"] == 2
    assert pol_row["kl"]["kl_k3"] >= 0.0
    for row in (ref_row, pol_row):
        assert set(row) >= {"rm_score", "rm_win_rate", "judge_win_rate", "mtbench"}
        assert row["judge_win_rate"]["n"] + row["judge_win_rate"]["invalid"] == 2
    assert first["reward_model_accuracy"]["n"] == 3
    assert first["reward_model_accuracy"]["accuracy"] in (0.0, 0.5, 1.0)  # three identical pairs
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report["results"]) == {"ref", "pol"}
    assert (tmp_path / "eval" / "eval.md").read_text().startswith("| model | n_without_eos | kl |")
    assert len((tmp_path / "eval" / "samples" / "pol.jsonl").read_text().splitlines()) == 2
    assert "sk-e2e-secret" not in (tmp_path / "eval" / "judge_cache.jsonl").read_text()


def test_evaluate_config_and_data_errors(saved_world, tmp_path):
    from distalign.evaluation import evaluate

    base = {"policies": [str(saved_world / "policy")], "prompts": str(saved_world / "prompts.jsonl"),
            "output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"eval config: unknown key 'judg'"):
        evaluate({**base, "judg": {}})
    with pytest.raises(ValueError, match=r"unknown key 'generation\.max_tokens'"):
        evaluate({**base, "generation": {"max_tokens": 3}})
    with pytest.raises(ValueError, match=r"field 'mtbench': needs a judge"):
        evaluate({**base, "mtbench": True})
    with pytest.raises(ValueError, match=r"field 'generation\.temperature': must be > 0"):
        evaluate({**base, "generation": {"temperature": 0}})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: field 'prompt': expected a non-empty string"):
        evaluate({**base, "prompts": str(bad)})


# ---- lm-evaluation-harness bridge ----------------------------------------------------------------------
def test_harness_summary_model_args_and_alignment_tax(tmp_path):
    from distalign.evaluation import alignment_tax, hflm_model_args, summarize_results

    raw = {"arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                   "acc_norm_stderr,none": "N/A"},
           "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.05}}
    summary = summarize_results(raw)
    assert summary == {"arc": {"acc": {"mean": 0.5, "stderr": 0.1}, "acc_norm": {"mean": 0.25, "stderr": None}},
                       "gsm8k": {"exact_match[strict-match]": {"mean": 0.125, "stderr": 0.05}}}
    worse = {"arc": {"acc": {"mean": 0.375, "stderr": 0.1}}}
    assert alignment_tax({"sft": summary, "dpo": worse}, "sft")["dpo"] == {"arc/acc": -0.125}
    (tmp_path / "full").mkdir()
    assert hflm_model_args(tmp_path / "full")["pretrained"] == str(tmp_path / "full")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/base"}')
    assert hflm_model_args(tmp_path / "lora") == {"pretrained": "/models/base", "peft": str(tmp_path / "lora"),
                                                  "dtype": "float32", "trust_remote_code": False}
    with pytest.raises(FileNotFoundError, match="missing: checkpoint folder not found"):
        hflm_model_args(tmp_path / "missing")
    # a .gguf file, as the policy or as the base an adapter trained on it records: HFLM's gguf_file
    gguf = tmp_path / "models" / "smol.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert hflm_model_args(gguf) == {"pretrained": str(gguf.parent), "gguf_file": "smol.Q4_1.gguf",
                                     "dtype": "float32", "trust_remote_code": False}
    (tmp_path / "lora_gguf").mkdir()
    (tmp_path / "lora_gguf" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gguf)}))
    assert hflm_model_args(tmp_path / "lora_gguf") == {"pretrained": str(gguf.parent), "gguf_file": "smol.Q4_1.gguf",
                                                       "peft": str(tmp_path / "lora_gguf"), "dtype": "float32",
                                                       "trust_remote_code": False}


def test_harness_missing_package_message():
    import importlib.util

    from distalign.evaluation import require_lm_eval
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed; the message for a missing install cannot be shown")
    with pytest.raises(ImportError, match=r"pip install 'distalign\[eval\]'"):
        require_lm_eval()


LOCAL_TASK = """task: distalign_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_harness_runs_a_local_task_on_a_checkpoint(saved_world, tmp_path):
    pytest.importorskip("lm_eval")
    from distalign.evaluation import run_lm_eval

    rows = [{"question": "the cat", "choices": ["sat", "ran"], "answer": 0},
            {"question": "a dog", "choices": ["on", "mat"], "answer": 1},
            {"question": "the", "choices": ["red", "big"], "answer": 1}]
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(LOCAL_TASK.format(data=data))
    scores = run_lm_eval(saved_world / "policy", ["distalign_local_choice"], include_path=str(tmp_path / "tasks"))
    accuracy = scores["distalign_local_choice"]["acc"]["mean"]
    assert scores["distalign_local_choice"]["acc"]["stderr"] is not None
    assert accuracy * 3 == pytest.approx(round(accuracy * 3))  # a fraction of the 3 questions
