"""Online pairwise and iterative methods on the synthetic-language testbed: a tiny Llama, warm-started on
pi0 samples, trained with the library's loops; oracle reward, win-rate or exact KL(pi*||pi) must improve."""
import json
import sys

import pytest
import torch

from distalign.config import ConfigError, load_config
from distalign.config.online_pairwise import (LOOP_METHODS, NEEDS_DEMOS, NEEDS_PAIRS, NEEDS_SCORES,
                                              OnlinePairwiseConfig)
from distalign.models import collate_sequences, load_policy, make_tiny, sequence_logps
from distalign.objectives import sft_loss
from distalign.testbed.lm import LMWorld, all_sequences
from distalign.testbed.lm_data import demonstrations, oracle_reward, preference_pairs, prompt_rows, write_jsonl
from distalign.testbed.lm_policy import hf_policy_logprob_fn, kl_target_to_policy, world_tokenizer
from distalign.training.online_pairwise import train_online_pairwise

ORACLE_MODULE = '''
from functools import lru_cache
from distalign.testbed.lm import LMWorld, all_sequences
from distalign.testbed.lm_data import oracle_reward

@lru_cache(maxsize=None)
def _world(path):
    return LMWorld.load(path)

def oracle(prompts, completions, world_path, kind="token", **_):
    """The testbed's exact oracle reward of the world saved at world_path (invalid text: far below any
    valid log pi*, a moderate penalty on the token-reward scale)."""
    invalid = -30.0 if kind == "logprob" else -5.0
    return oracle_reward(_world(world_path), prompts, completions, kind, invalid_reward=invalid)
'''


def warm_start(model_dir, world, tokenizer, steps=100, seed=0):
    """SFT on pi0 samples so the policy starts near the reference (and writes valid responses)."""
    model = load_policy(model_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = demonstrations(world, 64, seed=1000 + step)
        texts = world.sample_text([r["prompt"] for r in rows], seed=step, model="reference")
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
        responses = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        batch = collate_sequences(prompts, responses, tokenizer.pad_token_id)
        _, token_logps, _ = sequence_logps(model, batch)
        loss = sft_loss(token_logps, batch["response_mask"]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    # one thread: these models are tiny, and two threads on two busy cores are several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_pairwise")
    world = LMWorld.create(seed=3, n_words=4, max_len=3, n_prompts=4, reward_scale=1.5)
    world.save(root / "world.json")
    tokenizer = world_tokenizer(world)
    tokenizer.save_pretrained(str(root / "tok"))
    model_dir = make_tiny(root / "policy", hidden_size=32, num_layers=2, vocab_size=len(tokenizer),
                          tokenizer_dir=root / "tok", max_position_embeddings=32)
    warm_start(model_dir, world, tokenizer)
    (root / "oracle_rewards.py").write_text(ORACLE_MODULE)
    write_jsonl(root / "prompts.jsonl", prompt_rows(world, 64, seed=1))
    write_jsonl(root / "pairs.jsonl", preference_pairs(world, 4000, seed=2))
    write_jsonl(root / "demos.jsonl", demonstrations(world, 512, seed=3))
    sys.path.insert(0, str(root))  # the reward plugin is imported when a config naming it loads
    yield root, world, tokenizer, model_dir
    sys.path.remove(str(root))
    torch.set_num_threads(threads)


def config(lm, method, out, *overrides, kind="token"):
    """The method's config with only the fields it reads (the schema refuses the others)."""
    root, _, _, model_dir = lm
    reward = (f"rewards=[{{kind: callable, path: 'oracle_rewards:oracle', "
              f"kwargs: {{world_path: '{root / 'world.json'}', kind: {kind}}}}}]")
    loop, scored = method in LOOP_METHODS, method in NEEDS_SCORES
    fields = [f"method={method}", f"model.name_or_path={model_dir}", "optim.learning_rate=3e-3",
              "optim.schedule=constant", "train.batch_size=16", f"train.output_dir={out}", "train.progress_bar=false"]
    fields += [f"data.train={root / 'prompts.jsonl'}", reward] if scored else []
    fields += [f"pairs={root / 'pairs.jsonl'}"] if method in NEEDS_PAIRS else []
    fields += [f"demonstrations={root / 'demos.jsonl'}"] if method in NEEDS_DEMOS else []
    fields += ["train.max_steps=20", "generation.num_samples=2"] if loop else []
    fields += ["generation.max_new_tokens=4", "generation.temperature=1.0"] if method != "rpo_demos" else []
    return load_config(OnlinePairwiseConfig, None, [*fields, *overrides])


def exact_kl(lm, model_path):
    _, world, tokenizer, _ = lm
    return kl_target_to_policy(world, hf_policy_logprob_fn(load_policy(model_path), tokenizer)).value


def exact_win_rate(lm, model_path, baseline_path):
    """Oracle win-rate E_x sum_{y, y'} pi(y) pi_b(y') P*(y > y') by enumerating every valid response; text
    off the support loses to valid text and ties with invalid text (as `oracle_prefers`)."""
    _, world, tokenizer, _ = lm
    tokens = all_sequences(len(world.words), world.max_len)
    texts = world.decode(tokens)
    policy = hf_policy_logprob_fn(load_policy(model_path), tokenizer)
    baseline = hf_policy_logprob_fn(load_policy(baseline_path), tokenizer)
    total = 0.0
    for x, prompt in enumerate(world.prompts):
        target = world.target.logprob(torch.full((len(tokens),), x), tokens)
        pref = torch.sigmoid(world.gamma * (target[:, None] - target[None, :]))
        p, q = policy([prompt] * len(texts), texts).exp(), baseline([prompt] * len(texts), texts).exp()
        m, n = p.sum(), q.sum()
        total += float(p @ pref @ q + m * (1 - n) + 0.5 * (1 - m) * (1 - n))
    return total / len(world.prompts)


def exact_reward(lm, model_path) -> float:
    """E_x E_{y ~ pi} r(x, y) of the oracle token reward, by enumerating every valid response (the mass
    pi leaves on invalid text earns the oracle module's invalid reward, -5)."""
    _, world, tokenizer, _ = lm
    texts = world.decode(all_sequences(len(world.words), world.max_len))
    policy = hf_policy_logprob_fn(load_policy(model_path), tokenizer)
    total = 0.0
    for prompt in world.prompts:
        p = policy([prompt] * len(texts), texts).exp()
        r = torch.tensor(oracle_reward(world, [prompt] * len(texts), texts, "token", invalid_reward=-5.0))
        total += float(p @ r.to(p.dtype) - 5.0 * (1 - p.sum()))
    return total / len(world.prompts)


def mean(values):
    return sum(values) / len(values)


# The expected oracle reward of the final policy, computed exactly (1.62 at the warm start), not the
# logged per-step means: those swing by ~0.6 from step to step with the batch's prompts, so their
# first-vs-last difference ranged from -0.35 to 2.8 over train.seed 0-3 for the same method. Exact gains
# over seeds 0-3: online_dpo 0.42-0.73, rebel 0.95-1.49; an untrained policy's is exactly 0.
@pytest.mark.parametrize("method, overrides", [
    ("online_dpo", ("loss.beta=1.0", "train.max_steps=30")),
    ("rebel", ("loss.eta=1.0", "update_epochs=2", "loss.kl_coef=0.0")),
])
def test_reward_driven_methods_raise_oracle_reward(lm, monkeypatch, tmp_path, method, overrides):
    monkeypatch.syspath_prepend(str(lm[0]))
    result = train_online_pairwise(config(lm, method, tmp_path / method, *overrides), log=lambda *_: None)
    assert len(result["history"]) == (30 if method == "online_dpo" else 20)
    start, end = exact_reward(lm, lm[3]), exact_reward(lm, result["final_model"])
    assert end > start + 0.25, (method, start, end)


# Exact KL(pi*||pi) by enumeration (1.25 at the warm start). Both methods target pi* itself: distillation
# with R = log pi* and gamma = 1 (seed 001 Thm. 6), PMLE with pairs labelled by pi*. Distillation only fixes
# differences s_a - s_b of sampled pairs, so mass leaks to unsampled text unless the KL term anchors it:
# at kl_coef 0 it diverges (KL 2.9-5.6 over train.seed 0-4), at 0.1 it is seed-sensitive (0.96-1.25), at 0.3
# (here) it ends at 0.93-1.10 for every seed 0-4 (0.965 at seed 0).
@pytest.mark.parametrize("method, overrides, kind", [
    ("online_distill", ("loss.kl_coef=0.3", "optim.learning_rate=1e-3", "train.max_steps=60"), "logprob"),
    ("pmle_online", ("loss.kl_coef=0.1", "train.max_steps=40", "train.batch_size=64"), "token"),
])
def test_distribution_learning_methods_reduce_kl_to_target(lm, monkeypatch, tmp_path, method, overrides, kind):
    monkeypatch.syspath_prepend(str(lm[0]))
    before = exact_kl(lm, lm[3])
    result = train_online_pairwise(config(lm, method, tmp_path / method, *overrides, kind=kind), log=lambda *_: None)
    after = exact_kl(lm, result["final_model"])
    assert after < before - 0.1, (method, before, after)


def test_pmle_online_logs_kl_and_resumes_bitwise(lm, monkeypatch, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    args = ("train.max_steps=4", "train.save_every=2", "loss.kl_coef=0.1", "train.batch_size=8")
    full = train_online_pairwise(config(lm, "pmle_online", out, *args), log=lambda *_: None)["history"]
    weights = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    import shutil
    shutil.rmtree(out / "checkpoint-4")
    resumed = train_online_pairwise(config(lm, "pmle_online", out, *args, "train.resume=true"),
                                    log=lambda *_: None)["history"]
    again = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert full[2:] == resumed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("train/kl" in line and "train/preference_loss" in line for line in lines)


def test_config_errors_name_the_field(lm, tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        load_config(OnlinePairwiseConfig, None, ["method=pmle_online", "model.name_or_path=x"])
    with pytest.raises(ConfigError, match="num_samples"):
        config(lm, "rebel", tmp_path, "generation.num_samples=3")
    with pytest.raises(ConfigError, match="mixture"):
        config(lm, "nash_md_pg", tmp_path, "loss.mixture=1.5")
    with pytest.raises(ConfigError, match="update_epochs"):
        config(lm, "nash_md_pg", tmp_path, "update_epochs=2")
    with pytest.raises(ConfigError, match="rewards"):
        config(lm, "nash_md_pg", tmp_path, "rewards=[]")


def test_rpo_demos_reduces_kl_to_target(lm, tmp_path):
    """Demonstrations are pi* samples: RPO's NLL term moves the warm start (KL 1.25) toward pi*."""
    from distalign.training.iterative import train_iterative
    before = exact_kl(lm, lm[3])
    cfg = config(lm, "rpo_demos", tmp_path, "loss.beta=0.5", "train.max_steps=30",
                 "iteration.steps_per_iteration=30")
    result = train_iterative(cfg, log=lambda *_: None)
    after = exact_kl(lm, result["final_model"])
    assert len(result["history"]) == 30 and after < before - 0.1, (before, after)


@pytest.mark.parametrize("method", ["spin", "spac"])
def test_spin_and_spac_start_each_iteration_at_log_two(lm, tmp_path, method):
    """SPIN's reference is the previous iterate, so the first loss of every iteration is exactly log 2;
    SPAC's demo term starts at log 2 too (policy == pi0), plus alpha * log 2 for the pairs."""
    import math
    from distalign.training.iterative import train_iterative
    alpha = ["loss.alpha=0.5"] if method == "spac" else []
    cfg = config(lm, method, tmp_path, "loss.beta=0.1", "optim.learning_rate=1e-3", "train.max_steps=10",
                 "iteration.steps_per_iteration=5", *alpha)
    losses = [h["train/loss"] for h in train_iterative(cfg, log=lambda *_: None)["history"]]
    assert losses[0] == pytest.approx(math.log(2) * (1.0 if method == "spin" else 1.5), abs=1e-5)
    if method == "spin":
        assert losses[5] == pytest.approx(math.log(2), abs=1e-5) and losses[4] < math.log(2)


# Exact KL(pi*||pi) from the warm start (1.253) after 3 iterations x 30 steps, beta 1 (the world's gamma),
# lr 1e-3, batch 32, alpha 0.5, measured over train.seed=0..7:
#   spin: 0.711 0.649 0.743 0.768 0.654 0.651 0.728 0.632 -> improvement mean 0.561, seed std 0.052, min 0.485
#   spac: 0.833 0.800 0.800 0.823 0.757 0.800 0.737 0.775 -> improvement mean 0.462, seed std 0.033, min 0.419
# The margin 0.25 is ~5x the larger seed std (0.052), and each method's mean sits > 6 of its stds above it,
# so a seed that passes has moved toward pi* by far more than seed noise. The test can fail: with beta 0.1
# (otherwise as here) SPIN overshoots to KL 1.85-2.67, worse than the start; with beta 0.5, 2 x 15 steps of
# batch 16 (alpha 1) the seeds land on either side of it (improvements -0.64..0.18 SPIN, -0.71..0.07 SPAC).
@pytest.mark.parametrize("method", ["spin", "spac"])
def test_spin_and_spac_reduce_kl_to_target_beyond_seed_noise(lm, tmp_path, method):
    """Demonstrations are pi* samples (and pairs are labelled by pi*): every training seed must move the warm
    start toward pi* by more than the margin, not just on average."""
    from distalign.training.iterative import train_iterative
    before = exact_kl(lm, lm[3])
    afters = []
    for seed in (0, 1, 2):
        alpha = ["loss.alpha=0.5"] if method == "spac" else []
        cfg = config(lm, method, tmp_path / f"seed{seed}", "loss.beta=1.0", "optim.learning_rate=1e-3",
                     "train.batch_size=32", *alpha, "train.max_steps=90",
                     "iteration.steps_per_iteration=30", f"train.seed={seed}")
        result = train_iterative(cfg, log=lambda *_: None)
        assert len(result["history"]) == 90
        afters.append(exact_kl(lm, result["final_model"]))
    assert all(before - after > 0.25 for after in afters), (method, before, afters)


# Oracle preference P(y > y') = sigma(log pi*(y) - log pi*(y')) (reward kind logprob, the world's gamma = 1).
# Nash-MD-PG targets the regularised game's equilibrium, which for these transitive preferences is sharper
# than pi* (the Condorcet winner as tau -> 0), so what it must raise is the exact win-rate against the warm
# start (0.5 there), not lower KL(pi*||pi) (which ended at 1.21-3.44 from 1.25). Measured with the settings
# below (lr 1e-3, batch 32 x 2 samples, 60 steps, mixture 0.125, kl_coef 0.05) over train.seed 0-7:
#   0.641 0.650 0.666 0.650 0.649 0.657 0.656 0.655 -> mean 0.653, seed std 0.0075, min 0.641.
# With the preference replaced by uninformative U(0, 1) labels the same runs drift to 0.457-0.514 (seeds 0-4);
# with P = 1/2 nothing moves (l = 0 at the warm start, so the KL term has no gradient either). The bar 0.6
# (0.1 above the warm start) is 7 seed stds below the mean and 0.086 above every uninformed run.
def test_nash_md_pg_beats_the_warm_start_beyond_seed_noise(lm, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(lm[0]))
    rates = []
    for seed in (0, 1, 2):
        cfg = config(lm, "nash_md_pg", tmp_path / f"seed{seed}", "optim.learning_rate=1e-3",
                     "train.batch_size=32", "train.max_steps=60", f"train.seed={seed}", kind="logprob")
        result = train_online_pairwise(cfg, log=lambda *_: None)
        rates.append(exact_win_rate(lm, result["final_model"], lm[3]))
    assert all(rate > 0.6 for rate in rates), rates


def test_nash_md_pg_takes_preferences_from_the_judge(lm, monkeypatch, tmp_path):
    """A configured judge replaces the rewards' Bradley-Terry preference (here: y always beats y')."""
    (tmp_path / "always_first.py").write_text("def judge(prompts, a, b):\n    return [1.0] * len(a)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(lm[0]))
    cfg = config(lm, "nash_md_pg", tmp_path / "run", "judge=always_first:judge", "train.max_steps=2",
                 "train.batch_size=4", kind="logprob")
    history = train_online_pairwise(cfg, log=lambda *_: None)["history"]
    assert [h["train/preference_vs_opponent"] for h in history] == [1.0, 1.0]
    assert all(h["train/reward_mean"] < 0 for h in history)      # the rewards were still computed (log pi*)


@pytest.mark.parametrize("method", ["online_dpo", "online_distill", "rebel", "pmle_online", "spin", "spac",
                                    "rpo_demos", "nash_md_pg"])
def test_example_configs_load(method):
    from pathlib import Path
    cfg = load_config(OnlinePairwiseConfig, Path(__file__).parent.parent / "configs" / f"{method}.yaml")
    assert cfg.method == method


def test_nash_example_config_loads():
    from pathlib import Path
    from distalign.config.online_pairwise import NashConfig
    assert load_config(NashConfig, Path(__file__).parent.parent / "configs" / "nash_md.yaml").train.max_steps == 2000
