"""The offline training loop: SFT, reward models and every pairwise objective, on accelerate.

    distalign train dpo --config configs/dpo.yaml train.max_steps=100
    accelerate launch --multi_gpu --num_processes 2 -m distalign train dpo --config configs/dpo.yaml
    torchrun --nproc_per_node 2 -m distalign train dpo --config configs/dpo.yaml   # CPU-only machines

Data order is a per-epoch permutation drawn from (seed, epoch), and each process takes its slice of
every global batch, so a run is the same whatever the process count (for the same global batch)
and resumes exactly from (epoch, step).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from distalign.config import OfflineConfig, to_dict
from distalign.models import ReferenceModel, load_policy, load_reward_model

from .checkpoint import begin_run, run_identity, save_checkpoint_on_main
from .common import (
    StepGuard,
    bf16_linear_weights,
    bf16_training_weights,
    build_optimizer,
    build_scheduler,
    log_trainable_parameters,
    make_accelerator,
    record_length,
    save_final,
    set_seed,
)
from .metrics_log import MetricsLogger
from .reference_cache import precompute_reference_logps
from .run_data import load_records, load_run_tokenizer
from .sharded import is_sharded
from .tasks import PairwiseTask, build_task

LENGTH_GROUP = 50  # global batches sorted together by `group_by_length`


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class Batches:
    """Global batches of example indices; process `rank` gets its contiguous share of each micro-batch.

    With `lengths`, each run of `LENGTH_GROUP` global batches of the permutation is sorted by length
    before it is cut into batches, and the batches are then shuffled: batch members have similar
    lengths (little padding) while the order stays random and a function of (seed, epoch) only.
    """

    def __init__(self, n: int, per_process: int, accumulation: int, world: int, rank: int, seed: int,
                 lengths: torch.Tensor | None = None):
        self.n, self.per_process, self.accumulation = n, per_process, accumulation
        self.world, self.rank, self.seed, self.lengths = world, rank, seed, lengths
        self.global_batch = per_process * accumulation * world
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} training examples are fewer than one global batch of {self.global_batch} "
                             "(batch_size x gradient_accumulation_steps x processes)")
        self._order = (-1, None)

    def order(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            order = epoch_order(self.n, self.seed, epoch)[:self.steps_per_epoch * self.global_batch]
            if self.lengths is not None:
                runs = [run[self.lengths[run].argsort(descending=True, stable=True)]
                        for run in order.split(LENGTH_GROUP * self.global_batch)]
                batches = torch.cat(runs).view(-1, self.global_batch)
                order = batches[epoch_order(len(batches), self.seed + 1, epoch)].flatten()
            self._order = (epoch, order)
        return self._order[1]

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[torch.Tensor]:
        """Index tensors of this process's micro-batches for optimizer step `step_in_epoch` of `epoch`."""
        start = step_in_epoch * self.global_batch
        chunk = self.order(epoch)[start:start + self.global_batch].view(self.accumulation, self.world,
                                                                        self.per_process)
        return [chunk[i, self.rank] for i in range(self.accumulation)]


def _reduce_metrics(sums: dict, count: int, accelerator: Accelerator) -> dict:
    names = sorted(sums)
    stacked = torch.stack([sums[k] for k in names] + [torch.tensor(float(count), device=accelerator.device)])
    total = accelerator.reduce(stacked, reduction="sum")
    return {k: (total[i] / total[-1]).item() for i, k in enumerate(names)}


class OfflineTrainer:
    def __init__(self, cfg: OfflineConfig, accelerator: Accelerator | None = None, log=print):
        self.cfg, self.log = cfg, log
        self.acc = accelerator or make_accelerator(cfg.train.mixed_precision, cfg.train.retain_freed_memory,
                                                   fsdp=True, what=cfg.method)
        set_seed(cfg.train.seed)
        self.tokenizer = load_run_tokenizer(cfg.model, cfg.data)
        pad = self.tokenizer.pad_token_id
        self.task = build_task(cfg.method, pad, dict(cfg.loss), cfg.share_prompt)
        self.train_records = load_records(cfg.data, cfg.data.train, self.task.data_kind, self.tokenizer, log)
        self.eval_records = (load_records(cfg.data, cfg.data.eval, self.task.data_kind, self.tokenizer, log)
                             if cfg.data.eval else [])
        self.model = self._load_model()
        masters = bf16_training_weights(self.model, cfg.train.mixed_precision, self.acc)
        if self.acc.is_main_process:
            log_trainable_parameters(self.model, log)
        # A reference-free objective loads pi0 only for the diagnostics, once, when asked to precompute it.
        wants_reference = self.task.needs_reference or cfg.precompute_reference
        self.reference = self._load_reference() if wants_reference else None
        if masters is not None and self.reference is not None and self.reference.frozen is not None:
            bf16_linear_weights(self.reference.frozen)  # the same weights as the policy's at step 0
        if not wants_reference and isinstance(self.task, PairwiseTask):
            log(f"{cfg.method}: frac_in_undesirable and rewards/* need reference log-probs; "
                "precompute_reference=true computes them once")
        t = cfg.train
        lengths = torch.tensor([record_length(r) for r in self.train_records]) if cfg.group_by_length else None
        self.batches = Batches(len(self.train_records), t.batch_size, t.gradient_accumulation_steps,
                               self.acc.num_processes, self.acc.process_index, t.seed, lengths)
        self.total_steps = t.max_steps or max(1, math.floor(t.epochs * self.batches.steps_per_epoch))
        self.optimizer = build_optimizer(self.model, cfg.optim, masters)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.identity = run_identity(cfg, self.model, data={"train": self.train_records},
                                     global_batch=self.batches.global_batch, total_steps=self.total_steps,
                                     objective={"loss": self.loss_settings()})
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        if is_sharded(self.model) and t.save_merged:
            raise ValueError("train.save_merged: not supported for an FSDP-sharded run; merge final/ afterwards")
        if is_sharded(self.model) and self.acc.is_main_process:
            log(f"FSDP2: parameters, gradients and optimizer state sharded over {self.acc.num_processes} processes")
        self.guard = StepGuard(self.model.parameters(), self.optimizer, self.scheduler, cfg.optim.max_grad_norm,
                               self.acc, t.on_nonfinite, log)
        self.ref_cache = self.eval_ref_cache = None
        if self.reference is not None and cfg.precompute_reference:
            self.precompute_reference()

    def loss_settings(self) -> dict:
        """The objective's hyperparameters in effect: its signature's defaults overridden by `loss.*`."""
        objective = getattr(self.task, "objective", None)
        return {**(objective.hyperparameters() if objective is not None else {}), **dict(self.cfg.loss)}

    def precompute_reference(self) -> None:
        """Reference log-probs of every train and eval pair, once (disk-cached); a separate frozen
        reference is then released, since nothing asks it again."""
        self.ref_cache = precompute_reference_logps(self, self.train_records)
        if self.eval_records:
            self.eval_ref_cache = precompute_reference_logps(self, self.eval_records)
        if self.reference.frozen is not None:
            self.reference = None

    def _load_model(self):
        m = self.cfg.model
        lora = to_dict(m.lora) if m.lora is not None else None
        load = load_reward_model if self.cfg.method == "reward" else load_policy
        return load(m.name_or_path, **m.load_options(), lora=lora,
                    gradient_checkpointing=self.cfg.train.gradient_checkpointing)

    def _load_reference(self) -> ReferenceModel:
        """The LoRA policy with its adapter disabled (no copy), else a frozen copy of the initial weights."""
        m = self.cfg.model
        if m.lora is not None and self.cfg.reference is None:
            return ReferenceModel(self.model)
        ref = load_policy(self.cfg.reference or m.name_or_path, **m.load_options())
        return ReferenceModel(self.model, ref.eval().requires_grad_(False).to(self.acc.device))

    def batch(self, indices: torch.Tensor, records) -> dict:
        batch = self.task.collate([records[i] for i in indices.tolist()])
        cache = self.ref_cache if records is self.train_records else self.eval_ref_cache
        if cache is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = cache[0][indices], cache[1][indices]
        return {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[dict, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches.

        Returns per-example metric sums (including the loss) and the gradient norm before clipping.
        Each micro-batch's mean loss is divided by the number of micro-batches, so accumulation
        equals one big batch of the same size.
        """
        epoch, in_epoch = divmod(step, self.batches.steps_per_epoch)
        micro = self.batches.micro_batches(epoch, in_epoch)
        self.model.train()
        sums, step_loss = {}, torch.zeros((), device=self.acc.device)
        for i, indices in enumerate(micro):
            batch = self.batch(indices, self.train_records)
            sync = self.acc.no_sync(self.model) if i < len(micro) - 1 else nullcontext()
            with sync, self.acc.autocast():
                losses, metrics = self.task.loss(self.model, batch, self.reference)
                loss = losses.mean() / len(micro)
                self.acc.backward(loss)
            step_loss += loss.detach()
            for k, v in {"loss": losses.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.float().sum()
        norm = self.guard.step(step_loss, step + 1)
        return sums, float(norm)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_records:
            return {}
        self.model.eval()
        per = self.cfg.train.batch_size
        mine = torch.arange(self.acc.process_index, len(self.eval_records), self.acc.num_processes)
        sums, count = {}, 0
        for start in range(0, len(mine), per):
            indices = mine[start:start + per]
            with self.acc.autocast():
                losses, metrics = self.task.loss(self.model, self.batch(indices, self.eval_records), self.reference)
            for k, v in {"loss": losses, **metrics}.items():
                sums[k] = sums.get(k, 0) + v.float().sum()
            count += len(indices)
        return {f"eval/{k}": v for k, v in _reduce_metrics(sums, count, self.acc).items()}

    def save(self, step: int, epoch: int) -> Path | None:
        return save_checkpoint_on_main(self.acc, self.cfg.train.output_dir, step, self.acc.unwrap_model(self.model),
                                       self.optimizer, self.scheduler, {"step": step, "epoch": epoch},
                                       keep=self.cfg.train.keep_checkpoints, identity=self.identity)

    def train(self) -> dict:
        t = self.cfg.train
        out = Path(t.output_dir)
        main = self.acc.is_main_process
        start = begin_run(self.cfg, out, run=t, identity=self.identity, model=self.acc.unwrap_model(self.model),
                          optimizer=self.optimizer, scheduler=self.scheduler, log=self.log, main_process=main,
                          barrier=self.acc.wait_for_everyone)["step"]
        logger = MetricsLogger(out, main, self.total_steps, start, t.progress_bar, self.cfg.method, t.report_to,
                               to_dict(self.cfg))
        window, window_examples, history = {}, 0, []
        try:
            for step in range(start, self.total_steps):
                sums, grad_norm = self.train_step(step)
                for k, v in sums.items():
                    window[k] = window.get(k, 0) + v
                window_examples += self.batches.per_process * self.batches.accumulation
                logger.advance()
                done = step + 1
                if done % t.log_every == 0 or done == self.total_steps:
                    metrics = {f"train/{k}": v for k, v in _reduce_metrics(window, window_examples, self.acc).items()}
                    metrics["train/learning_rate"] = self.scheduler.get_last_lr()[0]
                    metrics["train/grad_norm"] = float(grad_norm)
                    logger.log(done, metrics)
                    history.append({"step": done, **metrics})
                    window, window_examples = {}, 0
                if t.eval_every and done % t.eval_every == 0 and done < self.total_steps:
                    logger.log(done, self.evaluate())
                if t.save_every and done % t.save_every == 0 and done < self.total_steps:
                    self.save(done, done // self.batches.steps_per_epoch)
            # the last checkpoint comes before the final evaluation, so a resume of it logs that once
            self.save(self.total_steps, self.total_steps // self.batches.steps_per_epoch)
            final_eval = self.evaluate()
            if final_eval:
                logger.log(self.total_steps, final_eval)
        finally:
            logger.close()
        save_final(self.acc.unwrap_model(self.model), self.tokenizer, out, t, self.acc, self.optimizer)
        return {"output_dir": str(out), "final_model": str(out / "final"), "steps": self.total_steps,
                "history": history, "eval": final_eval}


def train_offline(cfg: OfflineConfig, log=print) -> dict:
    """Train SFT / reward / pairwise from a validated config; returns paths and the logged history."""
    return OfflineTrainer(cfg, log=log).train()
