"""A transformer policy fitted to an empirical objective until it is certified near the objective's minimum.

    table = SupportTable(world, model, tokenizer)          # (X, M) log pi(y|x), support-constrained
    fit = tabular_fit.pmle_fit(wins[None], gamma, prior=0.0)   # the objective, as a function of a table
    minimum = tabular_fit.solve([fit])[0]                  # its exact minimiser over all tables
    report = fit_to_tolerance(table, lambda t: fit.objective(t[None]).sum(), float(...), float(...))

Why this certifies convergence: every pairwise objective sees a policy only through its log-probs on
the world's responses, i.e. through the (X, M) table, and a loss over n pairs is the win-count
weighted sum `tabular_fit.weighted_mean` (the same library objective per pair). The tabular minimum
L_min is a lower bound for every network, and a network expressive enough to write any table on
the support attains it. So `gap = L(net) - L_min >= 0` measures the optimisation error directly,
and the stopping rule compares it with the statistical scale `L(pi_ref) - L_min`, the excess loss
of the method's own population limit on the same pairs.

The support constraint: a response position may emit a world word or EOS, never EOS first and only
EOS after max_len words (the world's support exactly); other tokens are masked out of the softmax.
Without it, the pairwise objectives leave the mass outside the world unidentified (they only see
log-ratios of world responses), and a full-batch fit moves it there at no cost.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from distalign.data import tokenize_prompts, tokenize_responses
from distalign.models import collate_sequences, sequence_logps

from .lm import LMWorld, all_sequences


def support_mask(world: LMWorld, tokenizer, batch: dict, vocab_size: int) -> Tensor:
    """(B, T, V) float64: 0 where a token may follow, -inf where it would leave the world's support.

    Only the positions whose logits predict a response token are masked (their label is always
    allowed there), so no masked entry is ever gathered and no -inf reaches a product with 0."""
    words = torch.tensor(tokenizer.convert_tokens_to_ids(list(world.words)))
    eos = tokenizer.eos_token_id
    blocked = torch.full((vocab_size,), -math.inf, dtype=torch.float64)
    middle = blocked.clone()
    middle[words], middle[eos] = 0.0, 0.0
    first, last = middle.clone(), blocked.clone()
    first[eos], last[eos] = -math.inf, 0.0
    mask = torch.zeros((*batch["input_ids"].shape, vocab_size), dtype=torch.float64)
    for row in range(len(mask)):
        start = int(batch["prompt_lengths"][row]) - 1
        for t in range(int(batch["response_mask"][row].sum())):
            mask[row, start + t] = first if t == 0 else last if t == world.max_len else middle
    return mask


class _Masked(torch.nn.Module):
    """The model with `mask` added to its logits: what `sequence_logps` scores is the constrained policy."""

    def __init__(self, lm: torch.nn.Module, mask: Tensor):
        super().__init__()
        self.lm, self.mask = lm, mask

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return SimpleNamespace(logits=logits + self.mask.to(logits.dtype))


class SupportTable:
    """log pi(y|x) of a causal LM for every prompt and response of the world, (X, M), with gradients.

    Rows are rendered as `distalign.data` renders them and scored by the library's `sequence_logps`
    (the trainers' scorer). `logps()` is the support-constrained policy (rows sum to 1);
    `logps(constrained=False)` the bare network, whose missing mass is what it puts outside the world."""

    def __init__(self, world: LMWorld, model, tokenizer):
        texts = world.decode(all_sequences(len(world.words), world.max_len))
        self.shape = (len(world.prompts), len(texts))
        prompts = [p for p in world.prompts for _ in texts]
        self.batch = collate_sequences(tokenize_prompts(prompts, tokenizer),
                                       tokenize_responses(texts * len(world.prompts), tokenizer),
                                       tokenizer.pad_token_id)
        self.model = model
        self.constrained = _Masked(model, support_mask(world, tokenizer, self.batch, model.config.vocab_size))

    def logps(self, constrained: bool = True) -> Tensor:
        module = self.constrained if constrained else self.model
        return sequence_logps(module, self.batch)[0].to(torch.float64).view(self.shape)


@dataclass
class FitReport:
    """What `fit_to_tolerance` did: final and reference losses, the gap to the certified minimum,
    whether the stopping rule was met, and its cost."""
    loss: float
    loss_min: float
    loss_ref: float
    gap: float
    tolerance: float
    converged: bool
    evaluations: int
    outer_steps: int
    adam_phases: int
    seconds: float
    stop_reason: str

    def to_dict(self) -> dict:
        return asdict(self)


SLOW = 0.95   # an L-BFGS outer step that keeps more of the gap than this hands over to Adam


def fit_to_tolerance(table: SupportTable, objective: Callable[[Tensor], Tensor], loss_min: float,
                     loss_ref: float, *, rel_tol: float = 0.01, max_evaluations: int = 3000,
                     inner_iterations: int = 25, adam_steps: int = 500, adam_lr: float = 1e-3) -> FitReport:
    """Full-batch L-BFGS (strong Wolfe line search) on the network's weights until
    L(net) - L_min <= rel_tol * (L_ref - L_min), checked after every `inner_iterations` evaluations.

    objective: (X, M) table -> scalar empirical loss. When an L-BFGS step removes less than 1 - SLOW
    of the remaining gap (on this ill-conditioned problem its line search can crawl or stall while
    the gradient is not zero), a phase
    of `adam_steps` full-batch Adam steps with a cosine-decayed learning rate from `adam_lr` moves
    on, then L-BFGS resumes with a fresh history. Stops unconverged once `max_evaluations` function
    evaluations are spent (every Adam step counts as one; the budget is checked between L-BFGS
    steps, so a run may exceed it by up to `inner_iterations`).
    """
    params = [p for p in table.model.parameters() if p.requires_grad]
    tolerance = rel_tol * max(loss_ref - loss_min, 0.0) + 1e-12
    state = {"evaluations": 0, "outer": 0, "adam_phases": 0}
    began = time.perf_counter()

    def gradient() -> Tensor:
        for p in params:
            p.grad = None
        loss = objective(table.logps())
        loss.backward()
        state["evaluations"] += 1
        return loss

    def done(loss: float) -> bool:
        return loss - loss_min <= tolerance or state["evaluations"] >= max_evaluations

    table.model.eval()
    loss = current_loss(table, objective)
    while not done(loss):
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=inner_iterations, history_size=50,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-13, tolerance_change=1e-16)
        previous = math.inf
        while not done(loss) and loss - loss_min < SLOW * (previous - loss_min):
            optimizer.step(gradient)
            state["outer"] += 1
            previous, loss = loss, current_loss(table, objective)
        if not done(loss):
            adam_phase(params, gradient, adam_steps, adam_lr, lambda: done(current_loss(table, objective)))
            state["adam_phases"] += 1
            loss = current_loss(table, objective)
    converged = loss - loss_min <= tolerance
    return FitReport(loss, loss_min, loss_ref, loss - loss_min, tolerance, converged, state["evaluations"],
                     state["outer"], state["adam_phases"], time.perf_counter() - began,
                     "tolerance" if converged else "max_evaluations")


def adam_phase(params, gradient: Callable[[], Tensor], steps: int, lr: float, stop: Callable[[], bool],
               check_every: int = 50) -> None:
    """Full-batch Adam with lr decayed by a cosine to 0 over `steps`, stopping early once `stop()`."""
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        gradient()
        optimizer.step()
        schedule.step()
        if (step + 1) % check_every == 0 and stop():
            break


@torch.no_grad()
def current_loss(table: SupportTable, objective: Callable[[Tensor], Tensor]) -> float:
    return float(objective(table.logps()))
