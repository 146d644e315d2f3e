"""The SAM family's math on what one process owns: no DeepSpeed, no autograd, no optimizer.

One step of every type (Foret et al. 2021; FSAM: Zhong et al. 2022, Eq. 5-7):

1. first pass: g = grad L_mean(w) is in place (`shards.grads()`);
2. `first_pass()` (re)builds the Fisher mask m when due, from this g, and perturbs
   w <- w + e with  e = rho_t / (b (||T g||_S + eps)) * m * T^2 g,
   where S is the set of perturbed tensors (ESAM: a random subset, b = beta; else all, b = 1),
   T = |w| for ASAM (adaptive) and 1 otherwise, and m is 1 outside the Fisher candidates;
3. second pass: h = grad L_mean(w + e) is in place;
4. `second_pass()` applies GSAM's correction h <- h - alpha * (g - proj_h g) for the gsam types;
5. the driver (`fsam_ds.sam.driver`) restores w exactly and steps the base optimizer with h;
   `end_step()`, or `discard_step()` when the update was not applied.

Every global quantity (norms, inner products, the Fisher threshold, ESAM's example ranking) is a
sum of local sums reduced by `shards.comm`, so the same code is exact on ZeRO shards.

A schedule (`SAMConfig.schedule`) decides in step 2, after the mask is due (mask rebuilds use g from
any step), whether this step is sharpness-aware. If not, nothing is perturbed, there is no second
pass, and the driver steps the base optimizer with g. The decision is identical on every rank: it
depends on the applied-update count, a generator seeded identically everywhere, or the all-reduced
||g||^2, and the state behind it is part of `state_dict`.

MSAM (`msam`, `fisher-msam`; Becker et al. 2024) takes one pass per step. `momentum_perturbation()`
perturbs w <- w + e with  e = -rho_t / (||m||_2 + eps) * M * m  before it, where m is the base
optimizer's first moment as the previous update left it (`shards.first_moments()`, Adam's exp_avg) and
M the Fisher mask (1 for msam; `renormalize` divides by ||M m|| instead). The pass computes
g = grad L_mean(w + e); `momentum_gradient()` checks it and, for fisher-msam, rebuilds the mask from g^2
at steps 0, T, 2T, ... (the only gradient there is), which then shapes e from the next step on; the
driver restores w exactly and steps the base optimizer with g. A step without m (the first: the
optimizer keeps none, or DeepSpeed's is still zero), without a mask yet, or that the schedule leaves
without sharpness, is a plain base step at w.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.sam.driver import NULL_OBSERVER, StepObserver
from fsam_ds.sam.fisher import global_topk
from fsam_ds.sam.shards import Comm, Piece, ShardAccess, pack_bits, unpack_bits


def _square_norm(t: Tensor) -> Tensor:
    """||t||^2 accumulated in float64 (exact enough to compare sharded and single-process runs)."""
    return torch.linalg.vector_norm(t, dtype=torch.float64).square()


_SCHEDULE_SEED_OFFSET = 1_000_003
_STATS_DECAY = 0.9
"""adaptive: weight of the history in the running mean and variance of ||g||^2 (AE-SAM's delta)."""

# Global index of entry j of parameter i is (i << _INDEX_SHIFT) + j: unique and ordered by
# (parameter, position) on every sharding, without any rank knowing the other parameters' sizes.
_INDEX_SHIFT = 40


@dataclass
class StepStats:
    """What one first pass did; the numbers are global (all ranks)."""

    finite: bool
    grad_norm: float
    """||g|| over every parameter, unscaled."""
    rho: float
    perturbation_norm: float
    mask_rebuilt: bool = False
    mask_density: float | None = None
    """Fraction of candidate entries in the Fisher mask."""
    perturbed_tensors: float = 1.0
    """Fraction of parameters perturbed this step (ESAM's random subset; 1 otherwise)."""
    sharpness_aware: bool = True
    """Whether the schedule made this a sharpness-aware step (else: a base step with g, no second pass)."""


class SharpnessAware:
    """State and math of the SAM family for the pieces of the parameters this process owns.

    Args:
        config: the step's configuration.
        pieces: this process's pieces, in the same order as `ShardAccess.pieces`.
        num_parameters: number of parameters in the whole model (identical on every rank).
        initial_lr: learning rate at which rho = config.rho when config.rho_min is set.
        planned_steps: the run's planned updates; the schedule `late:f` needs them.
    """

    def __init__(self, config: SAMConfig, pieces: Sequence[Piece], num_parameters: int, initial_lr: float,
                 planned_steps: int | None = None) -> None:
        kind, _ = config.schedule_rule
        if kind == "late" and not planned_steps:
            raise ConfigError(f"{config.key_prefix}schedule = {config.schedule!r} starts the sharpness-aware steps at "
                              "a fraction of the planned updates, which were not given: pass planned_steps (the "
                              "number of optimizer steps of the run) to SAMOptimizer / fsam_ds.initialize.")
        self.config = config
        self.planned_steps = planned_steps
        self.pieces = list(pieces)
        self.num_parameters = num_parameters
        self.initial_lr = float(initial_lr)
        self.step_count = 0
        self.fisher_mask: list[Tensor | None] | None = None  # bit-packed, per candidate piece
        self.mask_density: float | None = None
        self.fisher_sum: list[Tensor | None] | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        # its own stream: sharing ESAM's would tie the schedule's draw to ESAM's first tensor draw
        self.schedule_generator = torch.Generator().manual_seed(config.seed + _SCHEDULE_SEED_OFFSET)
        self.grad_sq_stats: tuple[float, float] | None = None  # adaptive: running mean, variance of ||g||^2
        self._pending_stats: tuple[float, float] | None = None
        # LookSAM: g_v per piece and its global norm, from the last applied sharpness-aware step
        self.reuse_direction: list[Tensor | None] | None = None
        self.reuse_norm = 0.0
        self._pending_direction: tuple[list[Tensor | None], float] | None = None
        self._first_grads: list[Tensor | None] | None = None
        # A step is committed by end_step or rolled back by discard_step (an overflow in the second pass
        # or in the base step). Until then the step's Fisher contribution and the mask it replaced wait:
        self._step_fisher: list[Tensor | None] | None = None  # the step's g^2 (accumulated estimator)
        self._replaced_mask: tuple[list[Tensor | None] | None, float | None] | None = None
        self.observer: StepObserver = NULL_OBSERVER

    # ---------------------------------------------------------------- first pass
    def _perturbed_tensors(self) -> Tensor | None:
        """ESAM's random subset: one draw per parameter from a generator seeded identically on every rank."""
        if not self.config.uses_esam:
            return None
        draw = torch.rand(self.num_parameters, generator=self.generator, dtype=torch.float64)
        return draw < self.config.beta

    def _masks(self) -> Iterator[Tensor | float]:
        """Per piece: the unpacked Fisher mask, or 1.0 / 0.0 for a piece without one."""
        dense = 1.0 if (not self.config.uses_fisher_mask or self.config.non_candidates == "dense") else 0.0
        for i, piece in enumerate(self.pieces):
            packed = self.fisher_mask[i] if self.fisher_mask is not None else None
            yield dense if packed is None else unpack_bits(packed, piece.size)

    def mask_counts(self) -> Tensor:
        """Per parameter (model order): [entries this rank's Fisher mask keeps, Fisher-candidate entries this
        rank holds], float64; zeros before the first mask. A local sum: all-reduced, it is the global count."""
        counts = torch.zeros(self.num_parameters, 2, dtype=torch.float64)
        if self.fisher_mask is not None:
            for piece, packed in zip(self.pieces, self.fisher_mask):
                if packed is not None:
                    counts[piece.index, 0] += float(unpack_bits(packed, piece.size).sum())
                    counts[piece.index, 1] += piece.size
        return counts

    def first_pass(self, shards: ShardAccess, lr: float) -> StepStats:
        """Rebuilds the mask when due and perturbs the weights (through `shards`)."""
        with self.observer.phase("first_pass"):
            return self._first_pass(shards, lr)

    @torch.no_grad()
    def _first_pass(self, shards: ShardAccess, lr: float) -> StepStats:
        cfg, comm = self.config, shards.comm
        grads = shards.grads()
        rho = cfg.rho_at(lr, self.initial_lr)
        active = self._perturbed_tensors()
        weights = shards.weights() if cfg.adaptive else None

        def is_active(i: int) -> bool:
            return grads[i] is not None and (active is None or bool(active[self.pieces[i].index]))

        def scaled(i: int) -> Tensor:  # T g
            return grads[i] * weights[i].abs() if weights is not None else grads[i]

        device = self._device(grads)  # keep the reductions on the gradients' device (NCCL needs CUDA)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        every_gradient_scaled_by_one = weights is None and active is None  # then ||T g||_S is ||g||
        for i, g in enumerate(grads):
            if g is not None:
                square = _square_norm(g)
                sums[0] += square
                if is_active(i):
                    sums[1] += square if every_gradient_scaled_by_one else _square_norm(scaled(i))
        comm.all_reduce(sums)
        grad_sq, active_sq = float(sums[0]), float(sums[1])
        perturbed = 1.0 if active is None else float(active.double().mean())
        if not math.isfinite(grad_sq):
            return StepStats(False, float("nan"), rho, 0.0, perturbed_tensors=perturbed)

        sharpness_aware = self._scheduled(grad_sq)
        rebuilt = False
        if cfg.uses_fisher_mask:
            self._accumulate_fisher(grads)
            if self.fisher_mask is None or self.step_count % cfg.mask_interval == 0:
                with self.observer.phase("rebuild_mask"):
                    self._rebuild_mask(comm, grads)
                rebuilt = True
        if not sharpness_aware:
            if cfg.uses_looksam and self.reuse_direction is not None:
                self._reuse(shards, grads, math.sqrt(grad_sq))
            return StepStats(True, math.sqrt(grad_sq), rho, 0.0, rebuilt, self.mask_density, 0.0,
                             sharpness_aware=False)

        denominator = math.sqrt(active_sq)
        if cfg.renormalize and cfg.uses_fisher_mask:
            denominator = self._masked_norm(comm, lambda i: scaled(i) if is_active(i) else None, device)
        coefficient = rho / ((cfg.beta if cfg.uses_esam else 1.0) * (denominator + cfg.eps))

        def direction(i: int) -> Tensor | None:  # T^2 g on the perturbed tensors
            if not is_active(i):
                return None
            return grads[i] * weights[i].square() if weights is not None else grads[i]

        if cfg.uses_gsam or cfg.uses_looksam:
            self._first_grads = [None if g is None else g.clone() for g in grads]
        e_norm = self._perturb(shards, direction, coefficient, device)
        return StepStats(True, math.sqrt(grad_sq), rho, e_norm, rebuilt, self.mask_density, perturbed)

    def _masked_norm(self, comm: Comm, values: Callable[[int], Tensor | None], device: torch.device) -> float:
        """||M v|| over every rank, v given per piece (None: not perturbed)."""
        masked_sq = torch.zeros(1, dtype=torch.float64, device=device)
        for i, mask in enumerate(self._masks()):
            value = values(i)
            if value is not None:
                masked_sq += _square_norm(value * mask)
        return math.sqrt(float(comm.all_reduce(masked_sq)))

    def _perturb(self, shards: ShardAccess, direction: Callable[[int], Tensor | None], coefficient: float,
                 device: torch.device) -> float:
        """w <- w + e with e = coefficient * M * direction(i) on each piece (None: unperturbed), M the Fisher
        mask; returns ||e|| over every rank."""
        delta_sq = torch.zeros(1, dtype=torch.float64, device=device)

        def deltas() -> Iterator[tuple[Tensor | None, Tensor | None]]:
            for i, mask in enumerate(self._masks()):
                d = None if isinstance(mask, float) and mask == 0.0 else direction(i)
                if d is None:
                    yield None, None
                    continue
                delta = d * coefficient
                support = None
                if isinstance(mask, Tensor):
                    delta = delta * mask
                    support = self.fisher_mask[i]  # packed: the undo holds it instead of a copy
                delta_sq.add_(_square_norm(delta))
                yield delta, support

        with self.observer.phase("apply_perturbation"):
            shards.apply_perturbation(deltas())
        return math.sqrt(float(shards.comm.all_reduce(delta_sq)))

    # ---------------------------------------------------------------- MSAM
    def momentum_perturbation(self, shards: ShardAccess, lr: float) -> StepStats:
        """MSAM, before the step's only pass: w <- w + e along the base optimizer's first moment when there
        is one (and a mask, for fisher-msam) and the schedule says so. The returned statistics lack the
        gradient's until `momentum_gradient`."""
        with self.observer.phase("first_pass"):
            return self._momentum_perturbation(shards, lr)

    @torch.no_grad()
    def _momentum_perturbation(self, shards: ShardAccess, lr: float) -> StepStats:
        cfg, comm = self.config, shards.comm
        rho = cfg.rho_at(lr, self.initial_lr)
        moments = shards.first_moments()
        device = self._device(moments)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # ||m||^2, and whether any rank lacks m
        for m in moments:
            if m is None:
                sums[1] += 1
            else:
                sums[0] += _square_norm(m)
        comm.all_reduce(sums)
        sharpness_aware = self._scheduled(math.nan)  # drawn on every step, so the draws follow the step count
        unperturbed = StepStats(True, math.nan, rho, 0.0, False, self.mask_density, 0.0, sharpness_aware=False)
        # no first moment yet, or DeepSpeed's zero state before its first update: a plain base step at w
        if float(sums[1]) > 0 or float(sums[0]) == 0.0 or not sharpness_aware:
            return unperturbed
        if cfg.uses_fisher_mask and self.fisher_mask is None:  # built from the first step's gradient
            return unperturbed
        denominator = math.sqrt(float(sums[0]))
        if cfg.renormalize and cfg.uses_fisher_mask:
            denominator = self._masked_norm(comm, lambda i: moments[i], device)
        e_norm = self._perturb(shards, lambda i: moments[i], -rho / (denominator + cfg.eps), device)
        return StepStats(True, math.nan, rho, e_norm, False, self.mask_density)

    def momentum_gradient(self, shards: ShardAccess, stats: StepStats) -> StepStats:
        """MSAM, after the pass: checks g (at w + e) and rebuilds the Fisher mask from g^2 when due. Returns
        `stats` completed; `finite` False when g is not finite on some rank (the update must be skipped)."""
        with self.observer.phase("second_pass"):
            return self._momentum_gradient(shards, stats)

    @torch.no_grad()
    def _momentum_gradient(self, shards: ShardAccess, stats: StepStats) -> StepStats:
        grads = shards.grads()
        grad_sq = torch.zeros(1, dtype=torch.float64, device=self._device(grads))
        for g in grads:
            if g is not None:
                grad_sq += _square_norm(g)
        grad_sq = float(shards.comm.all_reduce(grad_sq))
        if not math.isfinite(grad_sq):
            return replace(stats, finite=False, grad_norm=math.nan)
        rebuilt = False
        if self.config.uses_fisher_mask:
            self._accumulate_fisher(grads)
            if self.fisher_mask is None or self.step_count % self.config.mask_interval == 0:
                with self.observer.phase("rebuild_mask"):
                    self._rebuild_mask(shards.comm, grads)
                rebuilt = True
        return replace(stats, grad_norm=math.sqrt(grad_sq), mask_rebuilt=rebuilt, mask_density=self.mask_density)

    # ---------------------------------------------------------------- schedule
    def _scheduled(self, grad_sq: float) -> bool:
        """Whether this step is sharpness-aware (`SAMConfig.schedule`), from quantities every rank shares."""
        kind, value = self.config.schedule_rule
        n = self.step_count
        if kind == "every":
            return n % int(value) == 0
        if kind == "late":
            return n >= int(value * self.planned_steps)
        if kind == "random":
            return float(torch.rand(1, generator=self.schedule_generator, dtype=torch.float64)) < value
        if kind == "adaptive":
            # AE-SAM (Jiang et al. 2023): against the statistics of the steps before this one; the first is
            # sharpness-aware. The update waits for end_step, so a skipped step leaves them as they were.
            self._pending_stats = running_stats(self.grad_sq_stats, grad_sq)
            if self.grad_sq_stats is None:
                return True
            mean, variance = self.grad_sq_stats
            return grad_sq >= mean + value * math.sqrt(variance)
        return True

    # ---------------------------------------------------------------- LookSAM
    def _reuse(self, shards: ShardAccess, grads: Sequence[Tensor | None], grad_norm: float) -> None:
        """A step without sharpness: g <- g + alpha * ||g|| / ||g_v|| * g_v, in place of the first-pass g."""
        scale = self.config.reuse_alpha * grad_norm / (self.reuse_norm + self.config.eps)
        shards.set_grads([None if g is None or v is None else g + scale * v.to(g.device)
                          for g, v in zip(grads, self.reuse_direction)])

    def _hold_direction(self, comm: Comm, h: Sequence[Tensor | None]) -> None:
        """After a sharpness-aware step's second pass: g_v = h - (<h, g> / ||g||^2) g, the component of the
        update gradient h orthogonal to the first-pass g, with global sums; held until end_step."""
        g = self._first_grads
        sums = torch.zeros(2, dtype=torch.float64, device=self._device(h))
        for hi, gi in zip(h, g):
            if hi is not None and gi is not None:
                sums[0] += torch.dot(hi.double(), gi.double())
                sums[1] += _square_norm(gi)
        comm.all_reduce(sums)
        projection = float(sums[0]) / (float(sums[1]) + self.config.eps)
        direction = [None if hi is None or gi is None else (hi - projection * gi).float() for hi, gi in zip(h, g)]
        norm_sq = torch.zeros(1, dtype=torch.float64, device=self._device(h))
        for v in direction:
            if v is not None:
                norm_sq += _square_norm(v)
        self._pending_direction = (direction, math.sqrt(float(comm.all_reduce(norm_sq))))

    # ---------------------------------------------------------------- Fisher mask
    def _accumulate_fisher(self, grads: Sequence[Tensor | None]) -> None:
        """Holds this step's g^2 until `end_step` adds it to the sum: a skipped step must leave the sum
        bit for bit as it was, and (s + x) - x is not s in floating point. The cost is one fp32 copy
        of this rank's candidate gradient pieces, alive from the first pass to the end of the step
        (on a mask-rebuild step only until the mask is built)."""
        if self.config.fisher_estimator != "accumulated":
            return
        if self.fisher_sum is None:
            self.fisher_sum = [torch.zeros(p.size, dtype=torch.float32, device=self._device(grads))
                               if p.candidate else None for p in self.pieces]
        self._step_fisher = [None if total is None or g is None else g.float().square()
                             for total, g in zip(self.fisher_sum, grads)]

    def _fisher_scores(self) -> list[Tensor | None]:
        """The accumulated scores including this step: the sum plus the held g^2, computed into the
        held tensors (x + s equals s + x bit for bit), the sum itself untouched."""
        return [total if step is None else step.add_(total)
                for total, step in zip(self.fisher_sum, self._step_fisher)]

    @staticmethod
    def _device(grads: Sequence[Tensor | None]) -> torch.device:
        return next((g.device for g in grads if g is not None), torch.device("cpu"))

    def _rebuild_mask(self, comm: Comm, grads: Sequence[Tensor | None]) -> None:
        """Global top-int(N * keep_ratio) of the Fisher scores over every candidate entry of every rank."""
        candidates = [i for i, p in enumerate(self.pieces) if p.candidate]
        if self.config.fisher_estimator == "accumulated":
            accumulated = self._fisher_scores()
            scores = [accumulated[i] for i in candidates]
        else:
            device = self._device(grads)
            scores = [torch.zeros(self.pieces[i].size, device=device) if grads[i] is None
                      else grads[i].float().square() for i in candidates]
        count = torch.tensor([sum(s.numel() for s in scores)], dtype=torch.int64)
        total = int(comm.all_reduce(count))
        if total == 0:
            raise ValueError("No Fisher candidates: every parameter name matches candidate_exclude "
                             f"{self.config.candidate_exclude!r}. Narrow the patterns or use a non-fisher sam_type.")
        k = int(total * self.config.keep_ratio)  # floor, as in the paper's code
        bases = [(self.pieces[i].index << _INDEX_SHIFT) + self.pieces[i].offset for i in candidates]
        masks = global_topk(scores, bases, k, comm, total=total,
                            index_bits=(self.num_parameters << _INDEX_SHIFT).bit_length())
        self._replaced_mask = (self.fisher_mask, self.mask_density)
        self.fisher_mask = [None] * len(self.pieces)
        for i, mask in zip(candidates, masks):
            self.fisher_mask[i] = pack_bits(mask)
        self.mask_density = k / total
        self._step_fisher = None  # in the mask now; end_step clears the sum

    # ---------------------------------------------------------------- second pass and bookkeeping
    def second_pass(self, shards: ShardAccess) -> bool:
        """Checks h and, for gsam types, applies h' = h - alpha * g_perp (GSAM, Zhuang et al. 2022, Alg. 1).

        Returns False when h is not finite on some rank (the caller must then skip the update).
        """
        with self.observer.phase("second_pass"):
            return self._second_pass(shards)

    @torch.no_grad()
    def _second_pass(self, shards: ShardAccess) -> bool:
        h = shards.grads()
        sums = torch.zeros(3, dtype=torch.float64, device=self._device(h))
        g_old = self._first_grads if self.config.uses_gsam else None  # the sums GSAM needs
        for i, hi in enumerate(h):
            if hi is None:
                continue
            sums[0] += _square_norm(hi)
            if g_old is not None and g_old[i] is not None:
                sums[1] += torch.dot(g_old[i].double(), hi.double())
                sums[2] += _square_norm(g_old[i])
        shards.comm.all_reduce(sums)
        if not math.isfinite(float(sums.sum())):
            return False
        if g_old is not None and self.config.uses_gsam:
            eps, alpha = self.config.eps, self.config.alpha
            h_norm, g_norm = math.sqrt(float(sums[0])), math.sqrt(float(sums[2]))
            cosine = float(sums[1]) / (h_norm * g_norm + eps)
            corrected = []
            for hi, gi in zip(h, g_old):
                if hi is None or gi is None:
                    corrected.append(hi)
                    continue
                vertical = gi - (cosine * g_norm / (h_norm + eps)) * hi
                corrected.append(hi.add_(vertical, alpha=-alpha))
            shards.set_grads(corrected)
            h = corrected
        if self.config.uses_looksam:
            self._hold_direction(shards.comm, h)
        return True

    def end_step(self) -> None:
        """Commits the step: its Fisher contribution (or, after a rebuild, an empty sum) and its mask."""
        if self._replaced_mask is not None and self.fisher_sum is not None:
            for total in self.fisher_sum:
                if total is not None:
                    total.zero_()
        elif self._step_fisher is not None:
            for total, step in zip(self.fisher_sum, self._step_fisher):
                if step is not None:
                    total.add_(step)
        if self._pending_stats is not None:
            self.grad_sq_stats = self._pending_stats
        if self._pending_direction is not None:
            self.reuse_direction, self.reuse_norm = self._pending_direction
        self.step_count += 1
        self._forget_step()

    def discard_step(self) -> None:
        """Forgets the current step without counting it (an overflow skipped the update): the Fisher
        sum never saw it and a mask rebuilt in it gives way to the one it replaced."""
        if self._replaced_mask is not None:
            self.fisher_mask, self.mask_density = self._replaced_mask
        self._forget_step()

    def _forget_step(self) -> None:
        self._pending_stats = None
        self._pending_direction = None
        self._first_grads = None
        self._step_fisher = None
        self._replaced_mask = None

    # ---------------------------------------------------------------- ESAM example selection
    @torch.no_grad()
    def select_examples(self, loss_before: Tensor, loss_after: Tensor, comm: Comm) -> tuple[Tensor, int]:
        """ESAM's sharpness-sensitive data selection (Du et al. 2022, Sec. 3.2): keeps the
        max(1, int(n * gamma)) examples of the global batch whose loss rose most under e (ties go
        to the earlier example in rank order). The per-example rises are few, so every rank sees
        all of them (two small all-reduces) and ranks them the same way.

        Returns this rank's boolean keep-mask and the number kept over all ranks."""
        rise = (loss_after.detach().float() - loss_before.detach().float()).reshape(-1)
        counts = torch.zeros(comm.world_size, dtype=torch.int64, device=rise.device)
        counts[comm.rank] = rise.numel()
        comm.all_reduce(counts)
        offset, total = int(counts[: comm.rank].sum()), int(counts.sum())
        every = torch.zeros(total, dtype=torch.float32, device=rise.device)
        every[offset: offset + rise.numel()] = rise + 0.0  # -0.0 ranks as +0.0
        comm.all_reduce(every)
        kept = max(1, int(total * self.config.gamma))
        order = torch.sort(every, descending=True, stable=True).indices[:kept]
        keep = torch.zeros(total, dtype=torch.bool, device=rise.device)
        keep[order] = True
        return keep[offset: offset + rise.numel()], kept

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "step_count": self.step_count,
            "initial_lr": self.initial_lr,
            "fisher_mask": self.fisher_mask,
            "mask_density": self.mask_density,
            "fisher_sum": self.fisher_sum,
            "generator": self.generator.get_state(),
            "schedule_generator": self.schedule_generator.get_state(),
            "grad_sq_stats": self.grad_sq_stats,
            "reuse_direction": self.reuse_direction,
            "reuse_norm": self.reuse_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["config"]
        if saved.get("sam_type") != self.config.sam_type:
            raise ValueError(f"checkpoint was written with sam_type={saved.get('sam_type')!r}, "
                             f"this run uses {self.config.sam_type!r}; resume with the same sam_type")
        masks = state["fisher_mask"]
        if masks is not None:
            if len(masks) != len(self.pieces):
                raise ValueError(f"checkpoint holds Fisher masks for {len(masks)} parameter pieces, this process "
                                 f"owns {len(self.pieces)}; resume with the same model, world size and ZeRO stage")
            for piece, packed in zip(self.pieces, masks):
                if packed is not None and packed.numel() != (piece.size + 7) // 8:
                    raise ValueError(f"checkpoint's Fisher mask for {piece.name} has {packed.numel() * 8} bits, "
                                     f"the piece here has {piece.size} entries; the sharding differs")
        self.step_count = int(state["step_count"])
        self.initial_lr = float(state["initial_lr"])
        self.fisher_mask = masks
        self.mask_density = state["mask_density"]
        self.fisher_sum = state["fisher_sum"]
        self.generator.set_state(state["generator"])
        if "schedule_generator" in state:  # absent from checkpoints written before schedules existed
            self.schedule_generator.set_state(state["schedule_generator"])
        stats = state.get("grad_sq_stats")
        self.grad_sq_stats = None if stats is None else (float(stats[0]), float(stats[1]))
        self.reuse_direction = state.get("reuse_direction")
        self.reuse_norm = float(state.get("reuse_norm", 0.0))


def running_stats(stats: tuple[float, float] | None, value: float,
                  decay: float = _STATS_DECAY) -> tuple[float, float]:
    """Exponentially weighted mean and variance after `value`: m' = d m + (1 - d) x,
    v' = d v + (1 - d) (x - m)^2; the first value starts them at (x, 0)."""
    if stats is None:
        return value, 0.0
    mean, variance = stats
    return decay * mean + (1 - decay) * value, decay * variance + (1 - decay) * (value - mean) ** 2
