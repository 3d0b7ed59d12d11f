"""The non-finite guard of every trainer (`common.StepGuard`): a huge learning rate turns the weights to inf
after the first optimizer step; the run stops with a one-line message naming step 1 (exit code 2 from the
CLI) before any checkpoint or final model holds them, or, with train.on_nonfinite=skip, drops the step."""
import json

import pytest
import torch
from conftest import offline_overrides
from safetensors.torch import load_file

from distalign.cli.main import main
from distalign.config import OfflineConfig, load_config
from distalign.training.common import NonFiniteLossError, parameters_finite

HUGE = "optim.learning_rate=1e39"  # AdamW's first update is ~lr per weight: inf in float32
REWARD_MODULE = "def vowels(prompts, completions, **_):\n    return [sum(c in 'aeiou' for c in s) / max(1, len(s)) for s in completions]\n"


def assert_nothing_saved(out):
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def test_parameters_finite_sees_nan_and_inf():
    assert parameters_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not parameters_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not parameters_finite([torch.tensor([float("nan")], dtype=torch.bfloat16)])


@pytest.mark.parametrize("clip", ["optim.max_grad_norm=1.0", "optim.max_grad_norm=0"])
def test_offline_cli_stops_at_step_one_with_exit_code_2(world_dir, tmp_path, capsys, clip):
    out = tmp_path / "run"
    code = main(["train", "dpo", *offline_overrides(world_dir, "dpo", out, "train.max_steps=3", "train.save_every=1",
                                                    "train.report_to=none", HUGE, clip)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("distalign: error:")]
    assert code == 2 and len(lines) == 1
    assert "step 1: the weights after the optimizer step are not finite" in lines[0]
    assert_nothing_saved(out)


def test_gradient_norm_is_checked_without_clipping(world_dir, tmp_path):
    from distalign.training.offline import OfflineTrainer
    cfg = load_config(OfflineConfig, None, offline_overrides(world_dir, "sft", tmp_path / "a", "optim.max_grad_norm=0",
                                                             "train.max_steps=2", "train.report_to=none"))
    trainer = OfflineTrainer(cfg, log=lambda *_: None)
    trainer.train()
    norms = [json.loads(line)["train/grad_norm"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(n == n and n > 0 for n in norms)  # measured, not NaN
    trainer = OfflineTrainer(load_config(OfflineConfig, None, [*offline_overrides(
        world_dir, "sft", tmp_path / "b", "optim.max_grad_norm=0", "train.report_to=none")]), log=lambda *_: None)
    next(p for p in trainer.model.parameters() if p.requires_grad).register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss is [0-9.]+, gradient norm nan"):
        trainer.train_step(0)


def test_skip_drops_every_broken_step_and_keeps_the_weights(world_dir, tmp_path, capsys):
    out = tmp_path / "skip"
    code = main(["train", "sft", *offline_overrides(world_dir, "sft", out, "train.max_steps=3", "train.report_to=none",
                                                    HUGE, "train.on_nonfinite=skip")])
    printed = capsys.readouterr().out
    assert code == 0 and printed.count("step skipped") == 3
    from distalign.models import load_policy
    initial = load_policy(str(world_dir / "tiny")).state_dict()
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(initial[k], v) for k, v in final.items())


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "nf_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rewards=[{kind: callable, path: 'nf_rewards:vowels'}]"


def common(world_dir, out):
    return [f"model.name_or_path={world_dir / 'tiny'}", f"train.output_dir={out}", "train.progress_bar=false",
            "train.report_to=none", "train.save_every=1", "generation.max_new_tokens=4", "generation.temperature=1.0",
            HUGE]


def test_online_stops_before_saving(world_dir, tmp_path, rewards):
    from distalign.config.online import OnlineConfig
    from distalign.training.online import train_online
    out = tmp_path / "grpo"
    cfg = load_config(OnlineConfig, None, ["method=grpo", f"data.train={world_dir / 'data' / 'prompts.jsonl'}", rewards,
                                           "train.batch_size=4", "train.max_steps=3", *common(world_dir, out)])
    with pytest.raises(NonFiniteLossError, match="step 1: the weights after the optimizer step are not finite"):
        train_online(cfg, log=lambda *_: None)
    assert_nothing_saved(out)


@pytest.mark.parametrize("method", ["online_dpo", "spin"])
def test_online_pairwise_and_iterative_stop_before_saving(world_dir, tmp_path, rewards, method):
    from distalign.config.online_pairwise import OnlinePairwiseConfig
    from distalign.training.iterative import train_iterative
    from distalign.training.online_pairwise import train_online_pairwise
    out, data = tmp_path / method, world_dir / "data"
    inputs = ([f"demonstrations={data / 'demonstrations.jsonl'}"] if method == "spin" else
              [f"data.train={data / 'prompts.jsonl'}", rewards, "generation.num_samples=2"])
    cfg = load_config(OnlinePairwiseConfig, None, [f"method={method}", *inputs, "train.batch_size=4",
                                                   "train.max_steps=3", *common(world_dir, out)])
    with pytest.raises(NonFiniteLossError, match="step 1: the weights after the optimizer step are not finite"):
        (train_iterative if method == "spin" else train_online_pairwise)(cfg, log=lambda *_: None)
    assert_nothing_saved(out)


def test_irl_reward_step_stops_before_saving(world_dir, tmp_path):
    from distalign.config.irl import IRLConfig
    from distalign.training.irl import train_irl
    out, data = tmp_path / "irl", world_dir / "data"
    cfg = load_config(IRLConfig, None, [
        "method=irl", f"model.name_or_path={world_dir / 'tiny'}", f"demonstrations={data / 'demonstrations.jsonl'}",
        f"train.output_dir={out}", "train.report_to=none", "train.save_every=1", "reward.steps=2",
        "reward.batch_size=8", "reward.learning_rate=1e39", "rl.steps=1", "generation.max_new_tokens=4"])
    with pytest.raises(NonFiniteLossError, match="step 1: the weights after the optimizer step are not finite"):
        train_irl(cfg, log=lambda *_: None)
    assert_nothing_saved(out)
    assert not list(out.glob("iter-*"))
