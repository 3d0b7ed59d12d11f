"""`train.gradient_checkpointing`: the same losses, gradients and runs as without, with less memory held for
the backward, in every trainer that trains a language model (offline, online, online pairwise, iterative,
irl / aihf; tabular Nash has no network and no `train` section).

Memory is measured as the bytes of the tensors autograd keeps for the backward at the end of the forward
(an outer `saved_tensors_hooks` sees every saved tensor outside a checkpointed layer; inside one, the
checkpoint keeps only the layer input). That is the activation part of peak memory, and unlike RSS or
timings it does not depend on how busy the machine is."""
import pytest
import torch
from conftest import offline_overrides
from safetensors.torch import load_file

import distalign.models.loading as loading
from distalign.config import OfflineConfig, load_config
from distalign.config.irl import IRLConfig
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.training.irl import train_irl
from distalign.training.iterative import train_iterative
from distalign.training.offline import OfflineTrainer
from distalign.training.online import train_online
from distalign.training.online_pairwise import train_online_pairwise


def saved_bytes(run):
    """(result of run(), bytes of distinct storages autograd saved for the backward while it ran)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values())


def checkpointing_layers(model) -> int:
    return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_offline_same_loss_and_gradients_less_saved_memory(world_dir, tmp_path, lora):
    extra = ["model.lora={r: 4, alpha: 8}"] if lora else []
    runs = {}
    for on in (False, True):
        cfg = load_config(OfflineConfig, None, offline_overrides(
            world_dir, "dpo", tmp_path / str(on), "train.batch_size=8",
            f"train.gradient_checkpointing={str(on).lower()}", *extra))
        trainer = OfflineTrainer(cfg, log=lambda *_: None)
        assert (checkpointing_layers(trainer.model) > 0) == on
        trainer.model.train()
        batch = trainer.batch(torch.arange(8), trainer.train_records)
        (losses, _), held = saved_bytes(lambda: trainer.task.loss(trainer.model, batch, trainer.reference))
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[on] = losses.detach(), grads, held
    (loss_off, grads_off, held_off), (loss_on, grads_on, held_on) = runs[False], runs[True]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    assert any("lora_" in n for n in grads_on) == lora
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7, msg=name)
    # 2 decoder layers of width 32: the checkpointed forward keeps ~1/4 of what the plain one keeps.
    assert held_on < 0.5 * held_off, (held_on, held_off)


@pytest.fixture
def spy(monkeypatch):
    """Counts the models each trainer switches activation checkpointing on for (by class name)."""
    calls = []
    original = loading.enable_gradient_checkpointing

    def record(model):
        calls.append(type(loading.unwrap_model(model)).__name__)
        original(model)

    monkeypatch.setattr(loading, "enable_gradient_checkpointing", record)
    return calls


def same_weights(a_dir, b_dir, name="model.safetensors"):
    a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


REWARD_MODULE = """
def vowel_fraction(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in s) / max(1, len(s)) for s in completions]
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "gc_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rewards=[{kind: callable, path: 'gc_rewards:vowel_fraction'}]"


def online_overrides(world_dir, out, *extra):
    return [f"model.name_or_path={world_dir / 'tiny'}", f"data.train={world_dir / 'data' / 'prompts.jsonl'}",
            "train.max_steps=2", "train.batch_size=2", "generation.max_new_tokens=6", "generation.temperature=1.0",
            "generation.num_samples=2", "optim.learning_rate=1e-3", "train.progress_bar=false",
            f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_run_is_unchanged(world_dir, tmp_path, spy, reward_module, method):
    for on in ("false", "true"):
        train_online(load_config(OnlineConfig, None, [f"method={method}", reward_module, *online_overrides(
            world_dir, tmp_path / on, f"train.gradient_checkpointing={on}")]), log=lambda *_: None)
    assert spy == ["LlamaForCausalLM"]
    same_weights(tmp_path / "false" / "checkpoint-2", tmp_path / "true" / "checkpoint-2")


def test_online_pairwise_run_is_unchanged(world_dir, tmp_path, spy, reward_module):
    for on in ("false", "true"):
        train_online_pairwise(load_config(OnlinePairwiseConfig, None, ["method=online_dpo", reward_module,
                                                                       *online_overrides(
            world_dir, tmp_path / on, f"train.gradient_checkpointing={on}")]), log=lambda *_: None)
    assert spy == ["LlamaForCausalLM"]
    same_weights(tmp_path / "false" / "final", tmp_path / "true" / "final")


def test_iterative_run_is_unchanged(world_dir, tmp_path, spy):
    for on in ("false", "true"):
        train_iterative(load_config(OnlinePairwiseConfig, None, [
            "method=spin", f"model.name_or_path={world_dir / 'tiny'}",
            f"demonstrations={world_dir / 'data' / 'demonstrations.jsonl'}", "iteration.iterations=1",
            "iteration.steps_per_iteration=2", "train.batch_size=4", "generation.max_new_tokens=6",
            "optim.learning_rate=1e-3", "train.progress_bar=false", f"train.output_dir={tmp_path / on}",
            f"train.gradient_checkpointing={on}"]), log=lambda *_: None)
    assert spy == ["LlamaForCausalLM"]
    same_weights(tmp_path / "false" / "final", tmp_path / "true" / "final")


def test_irl_reward_and_rl_steps_use_it(world_dir, tmp_path, spy):
    for on in ("false", "true"):
        train_irl(load_config(IRLConfig, None, [
            "method=irl", f"model.name_or_path={world_dir / 'tiny'}", f"train.output_dir={tmp_path / on}",
            f"demonstrations={world_dir / 'data' / 'demonstrations.jsonl'}", "iterations=1",
            "generation.max_new_tokens=4", "generation.num_samples=2", "reward.steps=2", "reward.batch_size=4",
            "rl.steps=1", "rl.batch_size=2", f"train.gradient_checkpointing={on}"]), log=lambda *_: None)
    assert spy == ["LlamaForSequenceClassification", "LlamaForCausalLM"]  # the reward model, then the RL policy
    same_weights(tmp_path / "false" / "final", tmp_path / "true" / "final")
