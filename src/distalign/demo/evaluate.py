"""The demo's evaluation: the same numbers for every model, most of them against exact truth.

Exact (by enumerating every response of the world): KL(pi*||pi), the mass pi puts outside pi*'s support,
and the oracle win-rate against SFT, W = E P*(y > y_sft). Estimated on the model's own samples (+- one
standard error), as the literature does: the same win-rate (each sample against the SFT model's exact
distribution, `lm_policy.sampled_win_rate`, so that no shared SFT sample shifts every row alike), the
reward model's score and KL(pi||pi_sft).
"""
from __future__ import annotations

import torch

from distalign.data import tokenize_prompts, tokenize_responses
from distalign.evaluation import kl_to_reference, mean_stderr, response_logps, reward_scores, sample_responses
from distalign.models import load_policy, load_reward_model, load_tokenizer
from distalign.testbed.lm import LMWorld
from distalign.testbed.lm_data import preference_pairs
from distalign.testbed.lm_policy import (enumerated_logps, exact_win_rate, hf_policy_logprob_fn,
                                         kl_from_enumerated, mass_off_support, sampled_win_rate, target_logps)

TARGET = "pi* (target)"


def exact_metrics(world: LMWorld, logps: torch.Tensor, sft_logps: torch.Tensor) -> dict:
    """The exact columns from a model's enumerated log-probs (`enumerated_logps`) and SFT's."""
    return {"kl_target_to_policy": kl_from_enumerated(world, logps).value,
            "off_support_mass": mass_off_support(logps),
            "win_rate_exact": exact_win_rate(world, logps, sft_logps)}


def _sampled(world, prompts, texts, prompt_ids, response_ids, policy, sft, sft_logps, rm, tokenizer) -> dict:
    win, win_err = sampled_win_rate(world, prompts, texts, sft_logps)
    rm_mean, rm_err = mean_stderr(reward_scores(rm, tokenizer, prompts, texts, batch_size=256))
    pad = tokenizer.pad_token_id
    own = response_logps(policy, prompt_ids, response_ids, pad, batch_size=256) if policy is not None \
        else world.logprob(prompts, texts).float()
    kl_ref = kl_to_reference(own, response_logps(sft, prompt_ids, response_ids, pad, batch_size=256))
    return {"win_rate_vs_sft": win, "win_rate_vs_sft_stderr": win_err, "rm_score": rm_mean,
            "rm_score_stderr": rm_err, "kl_to_sft": kl_ref["kl"], "kl_to_sft_stderr": kl_ref["kl_stderr"]}


def reward_model_accuracy(world: LMWorld, rm, tokenizer, n: int, seed: int) -> float:
    """Share of fresh pairs where the RM ranks the response pi* prefers (P* > 1/2) higher."""
    pairs = preference_pairs(world, n, seed=seed)
    prompts = [p["prompt"] for p in pairs]
    a, b = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    ra = torch.tensor(reward_scores(rm, tokenizer, prompts, a, batch_size=256))
    rb = torch.tensor(reward_scores(rm, tokenizer, prompts, b, batch_size=256))
    truth = world.logprob(prompts, a) > world.logprob(prompts, b)
    return ((ra > rb) == truth).float().mean().item()


def model_logps(world: LMWorld, path: str, tokenizer) -> torch.Tensor:
    """A saved policy's enumerated log-probs (the sweep's only evaluation)."""
    return enumerated_logps(world, hf_policy_logprob_fn(load_policy(path).eval(), tokenizer))


def evaluate_models(world: LMWorld, models: dict, tokenizer_dir, settings) -> dict:
    """{model name: metrics}; the SFT model is the baseline of win-rates and the KL reference."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompts = [p for p in world.prompts for _ in range(settings.eval_samples_per_prompt)]
    sample = dict(max_new_tokens=world.max_len + 1, temperature=1.0, batch_size=256)
    sft = load_policy(models["sft"]).eval()
    sft_logps = enumerated_logps(world, hf_policy_logprob_fn(sft, tokenizer))
    rm = load_reward_model(models["reward_model"]).eval()
    results = {}
    for name, path in models.items():
        if name == "reward_model":
            continue
        policy = sft if name == "sft" else load_policy(path).eval()
        drawn = sample_responses(policy, tokenizer, prompts, seed=settings.seed + 200, **sample)
        row = _sampled(world, prompts, drawn.texts, drawn.prompts_ids, drawn.responses_ids, policy, sft,
                       sft_logps, rm, tokenizer)
        logps = sft_logps if name == "sft" else enumerated_logps(world, hf_policy_logprob_fn(policy, tokenizer))
        results[name] = {**row, **exact_metrics(world, logps, sft_logps)}
    target_texts = world.sample_text(prompts, seed=settings.seed + 300, model="target")
    target = _sampled(world, prompts, target_texts, tokenize_prompts(prompts, tokenizer),
                      tokenize_responses(target_texts, tokenizer), None, sft, sft_logps, rm, tokenizer)
    results[TARGET] = {**target, **exact_metrics(world, target_logps(world), sft_logps)}
    results["_reward_model_accuracy"] = reward_model_accuracy(world, rm, tokenizer, 1000, settings.seed + 400)
    return results
