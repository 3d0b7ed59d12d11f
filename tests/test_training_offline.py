"""The offline loop on a tiny Llama: pinned values, accumulation, resume, NaN guard, LoRA, caching."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import offline_overrides

from distalign.config import OfflineConfig, load_config
from distalign.training.checkpoint import latest_checkpoint
from distalign.training.common import NonFiniteLossError
from distalign.training.offline import OfflineTrainer, train_offline


def trainer(world_dir, method, out, *extra):
    cfg = load_config(OfflineConfig, None, offline_overrides(world_dir, method, out, *extra))
    return OfflineTrainer(cfg, log=lambda *a: None)


def weights(t):
    return {k: v.clone() for k, v in t.acc.unwrap_model(t.model).state_dict().items()}


def test_dpo_starts_at_log2_and_learns(world_dir, tmp_path):
    """Policy == reference at step 0, so every pair's DPO loss is exactly log 2; then accuracy rises."""
    pairs = world_dir / "data" / "pairs.jsonl"
    t = trainer(world_dir, "dpo", tmp_path / "dpo", "train.max_steps=24", "loss.beta=0.5", f"data.eval={pairs}",
                "optim.schedule=constant")
    before = t.evaluate()
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval/margin"] == pytest.approx(0.0, abs=1e-5)
    result = t.train()
    assert result["eval"]["eval/loss"] < math.log(2) - 0.05
    assert result["eval"]["eval/accuracy"] > before["eval/accuracy"]
    assert (tmp_path / "dpo" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_gradient_accumulation_equals_big_batch(world_dir, tmp_path):
    big = trainer(world_dir, "dpo", tmp_path / "a", "train.batch_size=8", "train.max_steps=2", "optim.max_grad_norm=0")
    acc = trainer(world_dir, "dpo", tmp_path / "b", "train.batch_size=4", "train.gradient_accumulation_steps=2",
                  "train.max_steps=2", "optim.max_grad_norm=0")
    for step in range(2):
        big.train_step(step)
        acc.train_step(step)
    for (name, a), b in zip(weights(big).items(), weights(acc).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_is_bitwise(world_dir, tmp_path):
    straight = tmp_path / "straight"
    train_offline(load_config(OfflineConfig, None, offline_overrides(
        world_dir, "sft", straight, "train.max_steps=10")), log=lambda *a: None)
    split = tmp_path / "split"
    base = offline_overrides(world_dir, "sft", split, "train.max_steps=10", "train.save_every=5")
    t = OfflineTrainer(load_config(OfflineConfig, None, base), log=lambda *a: None)
    for step in range(5):
        t.train_step(step)
    t.save(5, 0)
    resumed = OfflineTrainer(load_config(OfflineConfig, None, [*base, "train.resume=true"]), log=lambda *a: None)
    resumed.train()
    from safetensors.torch import load_file
    a = load_file(str(latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(split) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    t = trainer(world_dir, "dpo", out, "train.max_steps=6", "train.save_every=2")
    real_loss = t.task.loss

    def poisoned(model, batch, reference=None):
        losses, metrics = real_loss(model, batch, reference)
        return losses * float("nan") if poisoned.calls_left == 0 else losses, metrics

    def counting(model, batch, reference=None):
        poisoned.calls_left -= 1
        return poisoned(model, batch, reference)

    poisoned.calls_left = 3  # step 3's micro-batch turns NaN
    monkeypatch.setattr(t.task, "loss", counting)
    with pytest.raises(NonFiniteLossError, match="step 3: loss is nan"):
        t.train()
    kept = latest_checkpoint(out)
    assert kept.name == "checkpoint-2"
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(str(kept / "model.safetensors")).values())


def test_precomputed_reference_matches_on_the_fly(world_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "cache"))
    live = trainer(world_dir, "dpo", tmp_path / "live", "train.max_steps=2")
    cached = trainer(world_dir, "dpo", tmp_path / "cached", "train.max_steps=2", "precompute_reference=true")
    assert list((tmp_path / "cache" / "reference_logps").glob("*.safetensors"))
    for step in range(2):
        a, _ = live.train_step(step)
        b, _ = cached.train_step(step)
        torch.testing.assert_close(a["loss"], b["loss"], atol=1e-5, rtol=1e-5)


def test_precompute_caches_eval_pairs_too_and_frees_the_frozen_reference(world_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "cache"))
    pairs = world_dir / "data" / "pairs.jsonl"
    live = trainer(world_dir, "dpo", tmp_path / "live", f"data.eval={pairs}")
    cached = trainer(world_dir, "dpo", tmp_path / "cached", f"data.eval={pairs}", "precompute_reference=true")
    assert cached.reference is None and live.reference is not None
    live.train_step(0), cached.train_step(0)  # at step 0 policy == reference: delta ties are float noise
    ours, theirs = cached.evaluate(), live.evaluate()
    assert ours.keys() == theirs.keys() and "eval/margin" in ours
    assert all(ours[k] == pytest.approx(theirs[k], abs=1e-5) for k in ours), (ours, theirs)


def test_group_by_length_batches_similar_lengths_in_a_seeded_order():
    from distalign.training.offline import Batches
    lengths = torch.randint(10, 200, (1000,), generator=torch.Generator().manual_seed(0))
    grouped = Batches(1000, 4, 2, 2, 0, seed=3, lengths=lengths)
    plain = Batches(1000, 4, 2, 2, 0, seed=3)
    epoch = grouped.order(0)
    assert sorted(epoch.tolist()) == sorted(plain.order(0).tolist())  # the same examples, each once
    assert not torch.equal(epoch, grouped.order(1)) and torch.equal(epoch, Batches(
        1000, 4, 2, 2, 0, seed=3, lengths=lengths).order(0))

    def padding(batches):  # padded minus real tokens over an epoch's micro-batches, all ranks
        total = 0
        for step in range(batches.steps_per_epoch):
            for rank in (0, 1):
                batches.rank = rank
                for micro in batches.micro_batches(0, step):
                    total += int(lengths[micro].max() * len(micro) - lengths[micro].sum())
        return total
    assert padding(grouped) < 0.1 * padding(plain)


def test_lora_dpo_uses_adapter_disabled_reference(world_dir, tmp_path):
    t = trainer(world_dir, "dpo", tmp_path / "lora", "train.max_steps=3", "model.lora.r=4",
                "model.lora.target_modules=all-linear")
    assert t.reference.frozen is None  # no second copy of the weights
    first, _ = t.train_step(0)
    assert first["loss"].item() / 4 == pytest.approx(math.log(2), abs=1e-6)
    trainable = [n for n, p in t.acc.unwrap_model(t.model).named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


@pytest.mark.parametrize("method, extra", [("cpo", "loss.variant=clip"), ("pmle", "loss.gamma=1.0"),
                                           ("simpo", "loss.beta=2.0"), ("reward", "loss.l2=0.01")])
def test_other_methods_run_and_reduce_their_loss(world_dir, tmp_path, method, extra):
    pairs = world_dir / "data" / "pairs.jsonl"
    t = trainer(world_dir, method, tmp_path / method, "train.max_steps=16", "train.log_every=8", extra,
                f"data.eval={pairs}", "optim.learning_rate=3e-4")
    before = t.evaluate()["eval/loss"]
    after = t.train()["eval"]["eval/loss"]
    assert math.isfinite(after) and after < before


def test_pmle_needs_no_reference(world_dir, tmp_path):
    t = trainer(world_dir, "pmle", tmp_path / "pmle", "train.max_steps=1")
    assert t.reference is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_sets_both_glibc_thresholds():
    # In a fresh process: the settings are per process and every trainer test here already made them.
    code = "from distalign.training.common import retain_freed_memory; print(retain_freed_memory())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def test_cpu_runs_retain_freed_memory_unless_configured_off(monkeypatch):
    from distalign.training import common
    calls = []
    monkeypatch.setattr(common, "retain_freed_memory", lambda: calls.append(1))
    common.make_accelerator("no", retain_memory=False)
    assert calls == []
    common.make_accelerator("no")
    assert calls == [1]


def test_every_pairwise_method_logs_cpo_diagnostics_and_trls_rewards(world_dir, tmp_path, monkeypatch):
    """Step 1 scores the initial policy, which is the reference: rewards/* and the margin are exactly 0,
    no pair is in U (d_pi = d_ref) and rewards/accuracies is 0 (ties are not wins). Reference-free pmle
    logs them when its reference log-probs are precomputed, and only then."""
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "cache"))
    keys = ("frac_in_undesirable", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    for method, extra in (("dpo", ()), ("pmle", ("precompute_reference=true",))):
        first = train_offline(load_config(OfflineConfig, None, offline_overrides(
            world_dir, method, tmp_path / method, "train.max_steps=1", *extra)), log=lambda *a: None)["history"][0]
        for key in keys:
            assert first[f"train/{key}"] == pytest.approx(0.0, abs=1e-5), (method, key)
    plain = train_offline(load_config(OfflineConfig, None, offline_overrides(
        world_dir, "pmle", tmp_path / "plain", "train.max_steps=1")), log=lambda *a: None)["history"][0]
    assert not any(f"train/{key}" in plain for key in keys)
