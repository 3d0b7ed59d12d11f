"""The demo's evaluation: the same four numbers for every model, three of them against exact truth."""
from __future__ import annotations

import math

import torch

from distalign.data import tokenize_prompts, tokenize_responses
from distalign.evaluation import (kl_to_reference, mean_stderr, oracle_winrate, response_logps, reward_scores,
                                  sample_responses)
from distalign.models import load_policy, load_reward_model, load_tokenizer
from distalign.testbed.lm import LMWorld
from distalign.testbed.lm_data import oracle_judge, preference_pairs
from distalign.testbed.lm_policy import hf_policy_logprob_fn, kl_target_to_policy

TARGET = "pi* (target)"


def _row(world, prompts, texts, prompt_ids, response_ids, policy, sft, sft_texts, rm, tokenizer) -> dict:
    judge = oracle_judge(world)
    win = oracle_winrate(prompts, texts, sft_texts, judge)
    rm_mean, rm_err = mean_stderr(reward_scores(rm, tokenizer, prompts, texts, batch_size=256))
    pad = tokenizer.pad_token_id
    own = response_logps(policy, prompt_ids, response_ids, pad, batch_size=256) if policy is not None \
        else world.logprob(prompts, texts).float()
    kl_ref = kl_to_reference(own, response_logps(sft, prompt_ids, response_ids, pad, batch_size=256))
    return {"win_rate_vs_sft": win.rate, "win_rate_stderr": win.stderr, "rm_score": rm_mean,
            "rm_score_stderr": rm_err, "kl_to_sft": kl_ref["kl"], "kl_to_sft_stderr": kl_ref["kl_stderr"],
            "off_support": sum(math.isinf(v) for v in world.logprob(prompts, texts).tolist()) / len(texts)}


def reward_model_accuracy(world: LMWorld, rm, tokenizer, n: int, seed: int) -> float:
    """Share of fresh pairs where the RM ranks the response pi* prefers (P* > 1/2) higher."""
    pairs = preference_pairs(world, n, seed=seed)
    prompts = [p["prompt"] for p in pairs]
    a, b = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    ra = torch.tensor(reward_scores(rm, tokenizer, prompts, a, batch_size=256))
    rb = torch.tensor(reward_scores(rm, tokenizer, prompts, b, batch_size=256))
    truth = world.logprob(prompts, a) > world.logprob(prompts, b)
    return ((ra > rb) == truth).float().mean().item()


def evaluate_models(world: LMWorld, models: dict, tokenizer_dir, settings) -> dict:
    """{model name: metrics}; the SFT model is the baseline of win-rates and the KL reference."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompts = [p for p in world.prompts for _ in range(settings.eval_samples_per_prompt)]
    sample = dict(max_new_tokens=world.max_len + 1, temperature=1.0, batch_size=256)
    sft = load_policy(models["sft"]).eval()
    sft_texts = sample_responses(sft, tokenizer, prompts, seed=settings.seed + 100, **sample).texts
    rm = load_reward_model(models["reward_model"]).eval()
    results = {}
    for name, path in models.items():
        if name == "reward_model":
            continue
        policy = sft if name == "sft" else load_policy(path).eval()
        drawn = sample_responses(policy, tokenizer, prompts, seed=settings.seed + 200, **sample)
        row = _row(world, prompts, drawn.texts, drawn.prompts_ids, drawn.responses_ids, policy, sft, sft_texts, rm,
                   tokenizer)
        row["kl_target_to_policy"] = kl_target_to_policy(world, hf_policy_logprob_fn(policy, tokenizer)).value
        results[name] = row
    target_texts = world.sample_text(prompts, seed=settings.seed + 300, model="target")
    target = _row(world, prompts, target_texts, tokenize_prompts(prompts, tokenizer),
                  tokenize_responses(target_texts, tokenizer), None, sft, sft_texts, rm, tokenizer)
    results[TARGET] = {**target, "kl_target_to_policy": 0.0}
    results["_reward_model_accuracy"] = reward_model_accuracy(world, rm, tokenizer, 1000, settings.seed + 400)
    return results
