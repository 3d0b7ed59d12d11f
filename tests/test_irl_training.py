"""IRL / AIHF (tutorial seed 002 Eq. 21, 24) on the synthetic-language testbed: a tiny Llama warm-started on
pi0 samples, demonstrations drawn from pi*; the learned reward must separate demonstrations from the
policy's samples and one reward + RL round must move the policy toward pi* (exact KL by enumeration)."""
from pathlib import Path

import pytest
import torch
from test_online_pairwise_training import warm_start

from distalign.config import ConfigError, load_config
from distalign.config.irl import IRLConfig
from distalign.config.online import GenerationConfig
from distalign.models import load_policy, load_reward_model, make_tiny, reward_scores
from distalign.testbed.lm import LMWorld
from distalign.testbed.lm_data import demonstrations, preference_pairs, write_jsonl
from distalign.testbed.lm_policy import hf_policy_logprob_fn, kl_target_to_policy, world_tokenizer
from distalign.training.irl import train_irl
from distalign.training.sampling import build_sampler


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two on two busy cores
    root = tmp_path_factory.mktemp("lm_irl")
    world = LMWorld.create(seed=3, n_words=4, max_len=3, n_prompts=4, reward_scale=1.5)
    tokenizer = world_tokenizer(world)
    tokenizer.save_pretrained(str(root / "tok"))
    model_dir = make_tiny(root / "policy", hidden_size=32, num_layers=2, vocab_size=len(tokenizer),
                          tokenizer_dir=root / "tok", max_position_embeddings=32)
    warm_start(model_dir, world, tokenizer)
    write_jsonl(root / "demos.jsonl", demonstrations(world, 512, seed=3))
    write_jsonl(root / "pairs.jsonl", preference_pairs(world, 2000, seed=2))
    yield root, world, tokenizer, model_dir
    torch.set_num_threads(threads)


def config(lm, method, out, *overrides):
    root, _, _, model_dir = lm
    pairs = [f"pairs={root / 'pairs.jsonl'}"] if method == "aihf" else []  # irl refuses pairs
    return load_config(IRLConfig, None, [
        f"method={method}", f"model.name_or_path={model_dir}", f"demonstrations={root / 'demos.jsonl'}",
        *pairs, f"train.output_dir={out}", "iterations=2",
        "generation.max_new_tokens=4", "generation.temperature=1.0", "generation.num_samples=4",
        "reward.steps=40", "reward.batch_size=32", "reward.learning_rate=3e-3",
        "rl.method=rloo", "rl.steps=30", "rl.batch_size=16", "rl.optim.learning_rate=2e-3",
        "rl.optim.schedule=constant", "rl.loss.kl_coef=1.0", *overrides])


def exact_kl(lm, model_path):
    _, world, tokenizer, _ = lm
    return kl_target_to_policy(world, hf_policy_logprob_fn(load_policy(model_path), tokenizer)).value


def heldout_accuracy(lm, reward_dir, n=400):
    """P(r(x, y_demo) > r(x, y')) on fresh pi* demonstrations vs samples of the warm-start policy (ties 1/2)."""
    _, world, tokenizer, model_dir = lm
    rows = demonstrations(world, n, seed=77)
    prompts, demos = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    torch.manual_seed(5)
    sampler = build_sampler(tokenizer, GenerationConfig(max_new_tokens=4, temperature=1.0), str(model_dir))
    batch = sampler.sample(load_policy(model_dir), [tokenizer(p)["input_ids"] for p in prompts])
    lengths = batch.response_mask.sum(-1).long().tolist()
    samples = tokenizer.batch_decode([ids[:k] for ids, k in zip(batch.response_ids.tolist(), lengths)],
                                     skip_special_tokens=True)
    model = load_reward_model(reward_dir)
    margin = reward_scores(model, tokenizer, prompts, demos) - reward_scores(model, tokenizer, prompts, samples)
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


# Exact KL(pi*||pi) at the warm start: 1.25. Observed (train seeds 0, 1, 2) after iteration 1: 1.03, 0.96,
# 0.89; after iteration 2: 1.35, 1.18, 1.32 -- the kept reward model, trained on demonstrations vs samples
# of the improved pi_1, flattens, and the KL(pi||pi0) term of Eq. 21b pulls the policy back toward pi0
# (a third iteration pushes it down again: 0.98, 1.12, 0.91). Only the first round is asserted.
# Held-out reward accuracy after iteration 1: 0.66-0.74 (n = 400, SE ~0.023); chance is 0.5.
def test_irl_reward_separates_demos_and_first_round_moves_policy_toward_target(lm, tmp_path):
    before = exact_kl(lm, lm[3])
    result = train_irl(config(lm, "irl", tmp_path / "irl"), log=lambda *_: None)
    rounds = result["iterations"]
    assert [r["iteration"] for r in rounds] == [1, 2] and len(result["history"]) == 80
    assert heldout_accuracy(lm, rounds[0]["reward_model"]) > 0.6
    after_first = exact_kl(lm, rounds[0]["policy"])
    assert after_first < before - 0.1, (before, after_first)
    assert exact_kl(lm, result["final_model"]) == pytest.approx(exact_kl(lm, rounds[1]["policy"]), abs=1e-9)
    assert all("reward/pair_accuracy" not in h for h in result["history"])


def test_aihf_adds_the_preference_term(lm, tmp_path):
    """With alpha > 0 the reward loss carries the pair term: at the first step the reward head is random and
    near zero, so each term is about log 2 and the loss about (demo_weight + alpha) log 2."""
    import math
    cfg = config(lm, "aihf", tmp_path / "aihf", "iterations=1", "reward.steps=3", "rl.steps=1",
                 "reward.learning_rate=1e-6", "reward.alpha=0.5")
    result = train_irl(cfg, log=lambda *_: None)
    first = result["history"][0]
    assert "reward/pair_accuracy" in first
    assert first["reward/reward_loss"] == pytest.approx(1.5 * math.log(2), abs=0.05)
    assert Path(result["final_model"], "config.json").exists()


# AIHF, one reward + RL round (alpha 0.5): exact KL(pi*||pi) from 1.253 to 0.949, 1.057, 0.946, 0.923 over
# seeds 0-3 (improvement mean 0.285, seed std 0.06, min 0.196). Every seed must beat the start by 0.1:
# 3 seed stds below the mean improvement and half the smallest one seen.
def test_aihf_moves_the_policy_toward_the_target_for_every_seed(lm, tmp_path):
    before = exact_kl(lm, lm[3])
    afters = []
    for seed in (0, 1, 2):
        result = train_irl(config(lm, "aihf", tmp_path / f"aihf{seed}", "iterations=1", "reward.alpha=0.5",
                                  f"train.seed={seed}"), log=lambda *_: None)
        afters.append(exact_kl(lm, result["final_model"]))
    assert all(before - after > 0.1 for after in afters), (before, afters)


def test_irl_config_errors_name_the_field(lm, tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        load_config(IRLConfig, None, ["method=aihf", "model.name_or_path=x", "demonstrations=d.jsonl"])
    with pytest.raises(ConfigError, match="demonstrations"):
        load_config(IRLConfig, None, ["method=irl", "model.name_or_path=x"])
    with pytest.raises(ConfigError, match="rl.method"):
        config(lm, "irl", tmp_path, "rl.method=dpo")


def test_rl_step_scores_with_the_reward_steps_chat_settings(lm, tmp_path):
    """The learned reward model saw demonstrations rendered with data.chat_template / data.system; the RL
    step's reward source renders the samples' prompts the same way (it used the defaults, no system prompt)."""
    from distalign.training.irl import online_config
    cfg = config(lm, "irl", tmp_path, "data.system=Answer briefly.")
    [spec] = online_config(cfg, str(lm[3]), tmp_path / "rm", tmp_path / "rl", 0, 3).rewards
    assert spec.kind == "model" and spec.kwargs == {"chat_template": "auto", "system": "Answer briefly."}


@pytest.mark.parametrize("method", ["irl", "aihf"])
def test_example_configs_load(method):
    cfg = load_config(IRLConfig, Path(__file__).parent.parent / "configs" / f"{method}.yaml")
    assert cfg.method == method and cfg.rl.method == "rloo"
