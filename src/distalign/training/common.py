"""Pieces every training loop shares: seeding, optimiser and schedule, the guarded optimizer step (loss,
gradient norm and weights checked for NaN/inf), the final model, logging."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.optim.lr_scheduler import LambdaLR


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf; training stops before anything non-finite is saved."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def record_length(record) -> int:
    """Tokens of a tokenized record (any kind: pairs, demonstrations)."""
    fields = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
    return sum(len(getattr(record, f)) for f in fields if hasattr(record, f))


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP: `accelerate launch --config_file` with `distributed_type: FSDP`
    (or `--use_fsdp`) sets ACCELERATE_USE_FSDP=true for every process it starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(mixed_precision: str, retain_memory: bool = True, fsdp: bool = False, what: str = "this method"):
    """One Accelerator per run. Without a GPU, cpu=True makes a torchrun/accelerate multi-process launch
    form a gloo process group (MULTI_CPU) instead of silently running each process alone. A CPU run
    also keeps its freed memory (`retain_freed_memory`) unless `retain_memory` is off.

    An FSDP launch is refused unless the caller shards its model through `accelerator.prepare` and saves
    through `training.sharded` (`fsdp=True`: the offline trainer); FSDP must be version 2 (`fully_shard`),
    whose modules and checkpoints `training.sharded` handles. accelerate applies FSDP only to GPU-like
    process groups; on CPU distalign turns accelerate's FSDP2 path on itself (`_fsdp_on_cpu`)."""
    from accelerate import Accelerator
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # The DeepSpeed engine would own backward, the step, clipping and loss scaling over accumulation,
        # and checkpoints in its own pickled format: none of which distalign's loops or checkpoints do.
        raise LaunchError(f"{what}: DeepSpeed launches are not supported; shard with FSDP2 instead "
                           "(accelerate launch --config_file configs/accelerate/fsdp.yaml)")
    if fsdp_requested() and not fsdp:
        raise LaunchError(f"{what}: FSDP is supported by the offline trainer only (sft, reward and the pairwise "
                           "objectives); launch it without an FSDP accelerate config")
    from accelerate.state import AcceleratorState
    # accelerate keeps one AcceleratorState per process and refuses a second run's other mixed_precision
    # ("cannot be changed, restart your runtime"); each run here owns its accelerator, so start it afresh
    # (the process group, PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    if fsdp_requested():
        if accelerator.device.type == "cpu":
            _fsdp_on_cpu(accelerator, mixed_precision)
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise LaunchError("FSDP: set fsdp_version: 2 in the accelerate config (distalign shards with FSDP2, "
                               "e.g. configs/accelerate/fsdp.yaml)")
    if retain_memory and accelerator.device.type == "cpu":
        retain_freed_memory()
    return accelerator


def _fsdp_on_cpu(accelerator, mixed_precision: str) -> None:
    """Make accelerate's FSDP2 path (`accelerator.prepare` -> `fully_shard`, FSDP-aware gradient clipping and
    state dicts) run on a CPU process group. accelerate enables FSDP only for GPU-like distributed types;
    torch's FSDP2 itself shards over gloo on CPU, so the state accelerate would have set is set here."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    if accelerator.num_processes < 2:
        raise LaunchError("FSDP on CPU needs at least 2 processes (accelerate launch --num_processes N, N >= 2)")
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch exported
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold every glibc accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


def retain_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Keep freed heap memory in the process instead of handing it back to the OS (glibc only).

    Why: a CPU training step frees and reallocates tens of MB of activations every step. By default
    glibc maps tensors above a (moving) threshold fresh and trims the heap's free top, so the next step
    page-faults all of it in again: 10-35 thousand faults a step in offline DPO, 3-6% of its time
    (benchmarks/README.md). Fixing the mmap threshold at its maximum (32 MB) and the trim threshold
    at `trim_threshold` lets later steps reuse the same pages; peak RSS stays the same, but memory
    freed after the peak stays with the process. Returns whether both settings took (False off glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
            and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1)


class LaunchError(RuntimeError):
    """The run was launched in a way it cannot run as asked (process count)."""


def require_single_process(what: str) -> None:
    """Refuse a multi-process launch for a loop that has no data or gradient split across processes
    (each process would otherwise train its own copy and race on the same output folder)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise LaunchError(f"{what} runs in a single process, but it was launched as one of {world} "
                          "(WORLD_SIZE); start it without torchrun / accelerate launch")


def _flag_value(cmdline: list[str], name: str) -> str | None:
    """The value of `--name` (underscore or dash spelling, `--flag v` or `--flag=v`) on a command line."""
    for i, arg in enumerate(cmdline):
        for flag in (f"--{name}", f"--{name.replace('_', '-')}"):
            if arg == flag and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def _launcher_num_processes(cmdline: list[str]) -> tuple[int, str]:
    """(processes asked for, where) by an `accelerate launch` command line: its --num_processes, else
    `num_processes` in its --config_file (or accelerate's default config file), else 1."""
    value = _flag_value(cmdline, "num_processes")
    if value is not None:
        return (int(value) if value.isdigit() else 1), f"accelerate launch --num_processes {value}"
    config = _flag_value(cmdline, "config_file")
    if config is None:
        from accelerate.commands.config import default_config_file
        config = default_config_file
    try:
        settings = yaml.safe_load(Path(config).read_text()) or {}
        asked = int(settings.get("num_processes", 1)) if isinstance(settings, dict) else 1
    except (OSError, ValueError, TypeError, yaml.YAMLError):  # no file, or accelerate's own problem to report
        return 1, ""
    return asked, f"accelerate launch with {config} (num_processes: {asked})"


def check_launch(parent_cmdline: list[str] | None = None) -> None:
    """Refuse an `accelerate launch` asked for N > 1 processes (flag or config file) that started one.

    Without `--multi_gpu`, accelerate 1.x runs its single-process launcher on a machine without
    GPUs, whatever --num_processes says; the one process sees ACCELERATE_* variables but no
    WORLD_SIZE, and the launcher (its parent) still holds the flag on its command line.
    """
    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:  # not Linux: nothing to read the launcher's arguments from
            return
        parent_cmdline = raw.decode(errors="replace").split("\0")
    asked, where = _launcher_num_processes(parent_cmdline)
    if asked > 1:
        raise LaunchError(f"{where} started a single process (without --multi_gpu accelerate uses its "
                          f"one-process launcher); add --multi_gpu (on CPU the processes form a gloo group) or "
                          f"run torchrun --nproc_per_node {asked} -m distalign ...")


def average_gradients(model: torch.nn.Module, accelerator) -> None:
    """Every trainable gradient replaced by its mean over the processes: one all-reduce of a flat buffer.

    For loops that run several forwards of the policy before one backward, which DDP's per-forward
    hooks do not allow. A parameter without a gradient on some process counts as zeros there, so all
    processes reduce buffers of the same layout.
    """
    if accelerator.num_processes == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    for p, mean in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(mean.view_as(p.grad))


def process_sum(accelerator):
    """A function summing a tensor over the run's processes (for statistics of the global batch); the
    identity in a one-process run, where every batch statistic is already global."""
    if accelerator.num_processes == 1:
        return lambda tensor: tensor
    return lambda tensor: accelerator.reduce(tensor, reduction="sum")


def mean_over_processes(values: dict, accelerator) -> dict[str, float]:
    """Scalar metrics (tensors or numbers) averaged over the processes of a run, as floats; one sync."""
    names = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().to(accelerator.device).reshape(())
                           for k in names])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(names, stacked.tolist()))


LOW_PRECISION = (torch.bfloat16, torch.float16)


def build_optimizer(model: torch.nn.Module, optim, masters: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors).

    Parameters in bf16 / fp16 (`model.dtype=bfloat16`, or `bf16_linear_weights`, whose fp32 originals
    come in `masters`) are trained through fp32 master copies (`MasterWeightAdamW`): AdamW on the bf16
    weights themselves rounds most small updates away.
    The fused kernel (one pass over each tensor, no temporaries) runs on CUDA and, since torch 2.4, on
    CPU, where it is ~5x faster than the foreach path (25 M parameters, one thread: 0.026 s vs 0.138 s).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = dict(lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)
    if any(p.dtype in LOW_PRECISION for p in params):
        make = functools.partial(MasterWeightAdamW, masters=masters or {})
    else:
        make = torch.optim.AdamW
    if all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params):
        try:
            return make(groups, fused=True, **kwargs)
        except RuntimeError:  # an older torch without the CPU kernel
            pass
    return make(groups, foreach=True, **kwargs)


DITHER_PERIOD = 1 << 20  # distinct dither values; element i of every parameter uses value i mod this


@torch.no_grad()
def write_rounded(param: torch.Tensor, master: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """`param` (bf16; other dtypes: plain rounding) = fp32 `master` rounded up or down, by a dither
    that is fixed per element: its 16 dropped bits plus 16 fixed random bits (`_dither`), truncated.

    Why not round-to-nearest: the weights of a pretrained model sit on (or, dequantised from a
    4-bit GGUF, 8% of them exactly between) bf16 values, and an update far below one bf16 step is
    then lost (nearest) or blown up to half a step in the update's direction (between): the first
    DPO step's implicit-reward margin on SmolLM2 came out ~0 or 17x the fp32 one. With a dither
    u fixed per element, a master that moves by d steps from a bf16 value moves the weight one step
    with probability d, unbiased, and a master on a bf16 value is written back unchanged (u < 1).
    The same u at every step: nothing flickers between steps when the master stands still.
    `scratch`: an int32 buffer of at least the parameter's size, reused across calls (no page faults).
    """
    if param.dtype != torch.bfloat16 or master.dtype != torch.float32:
        param.copy_(master)
        return
    bits, out = master.reshape(-1).view(torch.int32), param.view(-1)
    dither = _dither(bits.device)
    whole = bits.numel() // DITHER_PERIOD * DITHER_PERIOD
    # Non-finite values stay non-finite (the added bits never reach the exponent); only values within
    # a bf16 step of fp32's maximum could overflow.
    rounded = torch.empty_like(bits) if scratch is None else scratch.view(-1)[:bits.numel()]
    torch.add(bits[:whole].view(-1, DITHER_PERIOD), dither, out=rounded[:whole].view(-1, DITHER_PERIOD))
    torch.add(bits[whole:], dither[:bits.numel() - whole], out=rounded[whole:])
    out.copy_(rounded.bitwise_and_(-65536).view(torch.float32))  # added to the magnitude bits: unbiased either sign


@functools.cache
def _dither(device: torch.device) -> torch.Tensor:
    """DITHER_PERIOD fixed uniform draws of 16 bits (int32), repeated along every parameter."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 1 << 16, (DITHER_PERIOD,), dtype=torch.int32, generator=generator).to(device)


def bf16_linear_weights(model: torch.nn.Module) -> dict:
    """The weights of the model's linear layers (not the LM head, not LoRA factors) turned bf16 in place
    by `write_rounded`; returns {parameter: its fp32 original} for `build_optimizer`'s masters.

    For `train.mixed_precision=bf16` (issue 15 §3): under autocast the matmuls run in bf16 as before
    while the residual stream, norms, embeddings and the fp32 head stay fp32, but the bf16 weights are
    made once per step by `write_rounded` from fp32 masters instead of by autocast's round-to-nearest
    at every forward (which loses or blows up small updates, see `write_rounded`; and saves the casts).
    Apply it to a frozen reference too, so that it equals the policy's weights at step 0 bit for bit.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    originals = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (not isinstance(module, torch.nn.Linear) or "lora_" in name or weight is None
                    or id(weight) in skip or weight.dtype != torch.float32):
                continue
            rounded = torch.empty_like(weight, dtype=torch.bfloat16)
            write_rounded(rounded, weight)
            if weight.requires_grad:
                originals[weight] = weight.data
            weight.data = rounded
    return originals


def bf16_training_weights(model: torch.nn.Module, mixed_precision: str, accelerator) -> dict | None:
    """`bf16_linear_weights(model)` for a `mixed_precision=bf16` run of an fp32 model, else None (other
    precisions, and FSDP / DeepSpeed runs, whose flat parameters want one dtype, keep autocast's casts)."""
    state = getattr(accelerator, "state", None)
    sharded = getattr(state, "fsdp_plugin", None) is not None or getattr(state, "deepspeed_plugin", None) is not None
    if mixed_precision != "bf16" or sharded or next(model.parameters()).dtype != torch.float32:
        return None
    return bf16_linear_weights(model)


@contextlib.contextmanager
def fp32_weights(optimizer):
    """Inside: the linears that `bf16_linear_weights` turned bf16 hold their fp32 masters (to save the
    final model as the fp32 model it was loaded as); bf16 again after. Other optimizers: no change."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    pairs = [(p, m) for p, m in zip(getattr(optimizer, "model_params", []), getattr(optimizer, "masters", []))
             if id(p) in optimizer.converted]
    kept = [p.data for p, _ in pairs]
    for p, m in pairs:
        p.data = m.detach()
    try:
        yield
    finally:
        for (p, _), data in zip(pairs, kept):
            p.data = data


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of low-precision (bf16 / fp16) parameters.

    Why (issue 15 §3): a bf16 weight of size ~0.02 has steps of ~1e-4, so an AdamW update of ~1e-6
    (lr 1e-6) rounds away: one step at lr 1e-6 changed 0.39% of SmolLM2's weights. Here the update
    lands on an fp32 copy, which accumulates it, and each step writes the copy back to the parameter
    by `write_rounded` (bf16: rounding with a fixed dither), so that the bf16 weights move by the
    fp32 update in expectation from the first step on. Gradients are the parameters' own, upcast.
    `state_dict` carries the master copies, so a resumed run continues from them, not from the rounding.
    """

    def __init__(self, groups: list[dict], masters: dict | None = None, **kwargs):
        """`masters`: {parameter: its fp32 original} where rounding has already lost it; fp32 parameters
        are their own masters (no copy)."""
        masters = masters or {}
        self.model_params = [p for g in groups for p in g["params"]]
        self.converted = {id(p) for p in self.model_params if p in masters}  # fp32 models turned bf16 for training

        def master(p):
            if p.dtype == torch.float32:
                return p
            if p in masters:
                return masters[p].requires_grad_(True)
            return p.detach().to(torch.float32).clone().requires_grad_(True)
        super().__init__([{**g, "params": [master(p) for p in g["params"]]} for g in groups], **kwargs)
        self.masters = [m for g in self.param_groups for m in g["params"]]
        self._buffer = None

    def _scratch(self) -> torch.Tensor | None:
        """One int32 buffer the size of the largest bf16 parameter, for `write_rounded`."""
        if self._buffer is None:
            sizes = [p.numel() for p in self.model_params if p.dtype == torch.bfloat16]
            if sizes:
                self._buffer = torch.empty(max(sizes), dtype=torch.int32, device=self.model_params[0].device)
        return self._buffer

    @torch.no_grad()
    def step(self, closure=None):
        copies = [(p, m) for p, m in zip(self.model_params, self.masters) if p is not m]
        for p, m in copies:
            m.grad = None if p.grad is None else p.grad.to(m.dtype)
        loss = super().step(closure)
        for p, m in copies:
            write_rounded(p, m, self._scratch())
            m.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """AdamW's state plus the master copies (None for fp32 parameters, which are their own)."""
        masters = [None if p is m else m.detach().clone() for p, m in zip(self.model_params, self.masters)]
        return {**super().state_dict(), "master_weights": masters}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is None:  # a checkpoint without masters: start them from the weights as they are
            masters = [p.detach() for p in self.model_params]
        masters = [p.detach() if saved is None else saved for p, saved in zip(self.model_params, masters)]
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self.masters, masters):
                if p is not m:
                    m.copy_(saved)
                    write_rounded(p, m, self._scratch())


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int) -> LambdaLR:
    """Linear warm-up for `warmup_steps`, then cosine / linear decay to 0 at `total_steps`, or constant."""
    warmup, schedule = optim.warmup_steps, optim.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def check_finite(loss: torch.Tensor, step: int, where: str = "loss") -> None:
    """Stop with a clear message on NaN/inf. One host sync per optimizer step, not per micro-batch."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"step {step}: {where} is {loss.detach().float().cpu().tolist()}; stopping without saving "
            "(lower the learning rate, check the data, or use float32)")


def parameters_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of `params` is finite: one fused pass of per-tensor 2-norms in float32 (NaN
    and inf propagate into them), then one host sync. The 2-norm is torch's fast fused path (the max-|x|
    norm ran ~10x slower on CPU); it overflows only for weights beyond ~1e19, which are broken anyway."""
    if not params:
        return True
    local = [p.to_local() if hasattr(p, "to_local") else p.detach() for p in params]  # FSDP: this shard
    low = [p for p in local if p.dtype in LOW_PRECISION]
    rest = [p for p in local if p.dtype not in LOW_PRECISION]
    norms = [*(torch._foreach_norm(low, 2, dtype=torch.float32) if low else ()),  # fp16 norms would overflow
             *(torch._foreach_norm(rest, 2) if rest else ())]
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


class StepGuard:
    """The optimizer step of every trainer, guarded against non-finite values.

    `step(loss, n)` clips (or, with max_grad_norm 0, only measures) the gradient norm, refuses a NaN/inf
    loss or gradient norm, steps the optimizer, then checks the updated parameters (`parameters_finite`).
    Anything non-finite stops the run with a one-line `NonFiniteLossError` naming step n, before any
    checkpoint or final model holds it; with on_nonfinite="skip" the step is dropped instead (the weights
    and optimizer state restored from a copy taken before it) and a warning is logged. Under fp16 loss
    scaling an inf gradient is the scaler's business (it skips the step), so only the weights are checked.
    """

    def __init__(self, params, optimizer, scheduler, max_grad_norm: float, accelerator=None,
                 on_nonfinite: str = "stop", log=print):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer, self.scheduler, self.acc, self.log = optimizer, scheduler, accelerator, log
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")  # inf: measure, never scale
        self.skip = on_nonfinite == "skip"
        self.scaled = getattr(accelerator, "scaler", None) is not None
        self.skipped = 0

    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm before clipping (None where the engine clips by itself: DeepSpeed)."""
        if self.acc is None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        norm = self.acc.clip_grad_norm_(self.params, self.max_norm)
        if norm is None:
            return None
        return torch.as_tensor(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    def _agree(self, ok: bool) -> bool:
        """Whether every process found its values finite (one tiny all-reduce in a multi-process run), so
        all stop or skip together: losses are per process, and FSDP weights are per-process shards."""
        if self.acc is None or self.acc.num_processes == 1:
            return ok
        flag = torch.tensor(float(ok), device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum") == self.acc.num_processes)

    def _all_finite(self, values: torch.Tensor) -> bool:
        return self._agree(bool(torch.isfinite(values).all()))

    def step(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """One guarded optimizer (and scheduler) step; `step` is the 1-based step named in messages.
        Returns the gradient norm before clipping (NaN where the engine does not report it)."""
        norm = self.grad_norm()
        checked = [loss.detach().float().reshape(())]
        if norm is not None and not self.scaled:
            checked.append(norm.detach().float().to(loss.device).reshape(()))
        problem = None if self._all_finite(torch.stack(checked)) else \
            f"loss is {checked[0].item()}, gradient norm {float('nan') if norm is None else float(norm)}"
        if problem is None:
            saved = self._snapshot() if self.skip else None
            self.optimizer.step()
            if not self._agree(parameters_finite(self.params)):
                problem = "the weights after the optimizer step are not finite"
                if saved is not None:
                    self._restore(saved)
        if problem is not None:
            if not self.skip:
                raise NonFiniteLossError(f"step {step}: {problem}; stopping without saving (lower the learning "
                                         "rate, check the data, use float32, or train.on_nonfinite=skip)")
            self.skipped += 1
            self.log(f"warning: step {step}: {problem}; step skipped ({self.skipped} so far)")
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.tensor(float("nan")) if norm is None else norm

    def _snapshot(self):
        import copy
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict())

    def _restore(self, saved) -> None:
        weights, state = saved
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
        self.optimizer.load_state_dict(state)


SAMPLING_FIELDS = ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "min_new_tokens",
                   "missing_eos_penalty")


def sampling_settings(generation) -> dict:
    """The generation settings that change what a run samples (for its run identity); the backend and
    its fast path may change between a run and its resume."""
    return {name: getattr(generation, name) for name in SAMPLING_FIELDS}


def log_trainable_parameters(model: torch.nn.Module, log=print) -> None:
    """One line at the start of a run: how many parameters train (a LoRA adapter's share is small)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%)")


def save_final(model: torch.nn.Module, tokenizer, output_dir: str | Path, run, accelerator=None,
               optimizer=None) -> Path:
    """output_dir/final: the model (or LoRA adapter), its config and the tokenizer, never optimizer state;
    with `run.save_merged`, the adapter merged into its base as a full model in output_dir/final-merged.
    With `accelerator`, call it on every process: an FSDP-sharded model is gathered (a collective) and the
    main process writes. A mixed_precision=bf16 run saves its fp32 masters (`fp32_weights(optimizer)`).
    The weights are checked first: a non-finite final model is never written."""
    from distalign.models import is_peft_model, save_model

    from .sharded import gather_model_state, is_sharded
    final = Path(output_dir) / "final"
    full = gather_model_state(model) if is_sharded(model) else None
    if accelerator is None or accelerator.is_main_process:
        if not parameters_finite(list(full.values()) if full is not None else list(model.parameters())):
            raise NonFiniteLossError(f"{output_dir}: the final weights are not finite; final model not written")
        with fp32_weights(optimizer):
            save_model(model, tokenizer, final, state_dict=full)
            if run.save_merged and is_peft_model(model):
                save_model(model, tokenizer, Path(output_dir) / "final-merged", merge=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def build_reference(policy: torch.nn.Module, model_cfg, reference: str | None, device):
    """pi0 for `policy`: its adapter-disabled self for LoRA (no copy), else a frozen copy of
    `reference` (default: the policy's initial weights) on `device`."""
    from distalign.models import ReferenceModel, is_peft_model
    name = reference or (None if is_peft_model(policy) else model_cfg.name_or_path)
    ref = ReferenceModel.for_policy(policy, name, **model_cfg.load_options())
    if ref.frozen is not None:
        ref.frozen.to(device)
    return ref
