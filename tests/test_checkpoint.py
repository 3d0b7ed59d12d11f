import torch

from distalign.config import OptimConfig
from distalign.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from distalign.training.common import NonFiniteLossError, build_optimizer, build_scheduler, check_finite


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    opt = build_optimizer(model, OptimConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=2))
    return model, opt, build_scheduler(opt, OptimConfig(warmup_steps=2), 20)


def step(model, opt, sched):
    model(torch.randn(3, 4)).pow(2).mean().backward()
    opt.step(), sched.step(), opt.zero_grad()


def test_resume_is_bitwise(tmp_path):
    model, opt, sched = make()
    for _ in range(6):
        step(model, opt, sched)
    reference = [p.clone() for p in model.parameters()]

    model, opt, sched = make()
    for _ in range(3):
        step(model, opt, sched)
    save_checkpoint(tmp_path, 3, model, opt, sched, {"step": 3, "order": torch.arange(4)})
    for _ in range(2):  # diverge, then restore
        step(model, opt, sched)
    model2, opt2, sched2 = make(seed=123)
    state = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2)
    assert state["step"] == 3 and torch.equal(state["order"], torch.arange(4))
    for _ in range(3):
        step(model2, opt2, sched2)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)


def test_atomic_layout_and_pruning(tmp_path):
    model, opt, sched = make()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, model, opt, sched, {"step": s}, keep=2)
    (tmp_path / ".tmp-checkpoint-9-x").mkdir()  # a crashed write is never picked up
    (tmp_path / "checkpoint-9").mkdir()  # nor a folder without state.json
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    files = sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_non_finite_loss_stops_with_message():
    check_finite(torch.tensor(1.0), 5)
    try:
        check_finite(torch.tensor(float("nan")), 7)
    except NonFiniteLossError as err:
        assert "step 7: loss is nan" in str(err)
    else:
        raise AssertionError("NaN passed")
