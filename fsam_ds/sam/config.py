"""Configuration of the sharpness-aware step, validated at construction."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, get_args, get_type_hints

SamType = Literal["sam", "esam", "gsam", "fisher-sam", "fisher-esam", "fisher-gsam", "msam", "fisher-msam"]
FisherEstimator = Literal["batch", "accumulated"]
NonCandidateMode = Literal["dense", "none"]
ReuseMode = Literal["none", "looksam"]
MSAM_TYPES: tuple[str, ...] = ("msam", "fisher-msam")
"""One pass per step at w + e along the base optimizer's first moment (Becker et al. 2024)."""
SAM_TYPES: tuple[str, ...] = tuple(t for t in get_args(SamType) if t not in MSAM_TYPES)
"""The two-pass steps (e from the first pass's g, the update from the second pass's h): the list the
tests parametrize over and compare with a two-pass reference. Every type is `SAM_TYPES + MSAM_TYPES`."""
SCHEDULES = ("always", "every", "late", "random", "adaptive")
"""The kinds of `SAMConfig.schedule`."""


def is_int(value: Any) -> bool:
    """An int, not a bool (which Python counts as one: --seed=true must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field, the value and the fix."""


def invalid_value(key: str, value: object, requirement: str, fix: str = "") -> ConfigError:
    """The one wording of a bad value: the key, the value, what it must be, and how to fix it."""
    message = f"Invalid value for config key '{key}': {value!r} {requirement}."
    return ConfigError(f"{message} {fix}" if fix else message)


@dataclass(frozen=True)
class SAMConfig:
    """Everything that defines one sharpness-aware (SAM-family) step.

    The defaults are those of the FSAM paper's code (rho 0.05, keep_ratio 0.1, mask every 100
    steps, ESAM beta = gamma = 0.5, GSAM alpha 0.4), with its defects fixed (see README).
    """

    sam_types: ClassVar[tuple[str, ...]] = SAM_TYPES + MSAM_TYPES
    """The values `sam_type` may take (the trainer's section adds its AdamW baseline)."""
    key_prefix: ClassVar[str] = ""
    """Put before field names in error messages (the trainer's section reports `sam.rho`)."""

    sam_type: SamType = "fisher-sam"
    rho: float = 0.05
    """Perturbation radius ||e|| (at the peak learning rate when `rho_min` is set)."""
    rho_min: float | None = None
    """If set, rho follows the learning rate linearly from `rho_min` at `lr_min` to `rho` at
    `lr_max` (GSAM's schedule); applies to every type so radii stay comparable across types."""
    lr_max: float | None = None
    """Learning rate at which rho = `rho`; None means the base optimizer's initial lr."""
    lr_min: float = 0.0
    beta: float = 0.5
    """ESAM: probability that a tensor is perturbed this step (the radius becomes rho / beta)."""
    gamma: float = 0.5
    """ESAM: fraction of examples kept for the second pass (those whose loss rose most)."""
    alpha: float = 0.4
    """GSAM: weight of the ascent along the first-pass gradient's component orthogonal to h."""
    keep_ratio: float = 0.1
    """Fisher types: fraction of candidate entries perturbed (the top entries by Fisher score)."""
    mask_interval: int = 100
    """Fisher types: the mask is rebuilt at steps 0, T, 2T, ... from that step's first pass."""
    candidate_exclude: tuple[str, ...] = ("bias", "embed")
    """Regular expressions (re.search) on parameter names: matching tensors are not Fisher candidates."""
    exclude_embeddings: bool = True
    """Weights of nn.Embedding modules, and parameters tied to them (a decoder's lm_head), are not Fisher
    candidates either, whatever their names (needs the model: `SAMOptimizer(module=...)`, `SAMEngine`)."""
    fisher_estimator: FisherEstimator = "batch"
    """'batch': g^2 of the rebuild step's batch (the paper's code). 'accumulated': sum of g^2 over
    every first pass since the previous rebuild (costs one fp32 buffer per candidate entry)."""
    non_candidates: NonCandidateMode = "dense"
    """Tensors outside the candidate set are perturbed densely (the paper's code) or not at all."""
    renormalize: bool = False
    """If true, the masked perturbation is rescaled so that ||e|| = rho exactly."""
    adaptive: bool = False
    """ASAM: scale the ascent direction elementwise by |w| (Kwon et al. 2021)."""
    eps: float = 1e-12
    """Added to norms before dividing."""
    seed: int = 0
    """Seed of the generators behind ESAM's random tensor subset and the random schedule (identical on
    every rank)."""
    schedule: str = "always"
    """Which steps are sharpness-aware; the others apply their first-pass gradient with the base optimizer
    (one forward-backward, no perturbation). 'always'; 'every:k': steps 0, k, 2k, ... (Composer's
    interval); 'late:f': from update int(f x planned updates) on; 'random:p': each step with probability
    p (RST); 'adaptive:c': when ||g||^2 >= mean + c x std of its running statistics (AE-SAM). Steps count
    applied updates, so a skipped step is decided again."""
    reuse: ReuseMode = "none"
    """'looksam' (Liu et al. 2022): a sharpness-aware step stores g_v, the component of its update gradient
    orthogonal to its first-pass g (global inner product and norms); a step the schedule leaves without
    sharpness applies g + reuse_alpha * ||g|| / ||g_v|| * g_v instead of g. Costs one fp32 copy of the
    rank's gradient shard (4 bytes per parameter / ranks)."""
    reuse_alpha: float = 0.2
    """LookSAM: weight of the reused component."""

    def __post_init__(self) -> None:
        if isinstance(self.candidate_exclude, (list, str)):
            value = (self.candidate_exclude,) if isinstance(self.candidate_exclude, str) else self.candidate_exclude
            object.__setattr__(self, "candidate_exclude", tuple(value))
        self.validate()

    @property
    def uses_fisher_mask(self) -> bool:
        return self.sam_type.startswith("fisher-")

    @property
    def uses_esam(self) -> bool:
        return self.sam_type.endswith("esam")

    @property
    def uses_gsam(self) -> bool:
        return self.sam_type.endswith("gsam")

    @property
    def uses_momentum(self) -> bool:
        """MSAM: e along the base optimizer's first moment, one pass per step."""
        return self.sam_type in MSAM_TYPES

    @property
    def uses_looksam(self) -> bool:
        return self.reuse == "looksam"

    def _check(self, ok: bool, name: str, requirement: str, fix: str = "") -> None:
        if not ok:
            raise invalid_value(self.key_prefix + name, getattr(self, name), requirement, fix)

    def validate(self) -> None:
        """Range checks of every field; raises ConfigError naming the first bad field, its value and the fix."""
        check, key, hints = self._check, self.key_prefix, get_type_hints(type(self))
        check(self.sam_type in self.sam_types, "sam_type", f"must be one of {', '.join(self.sam_types)}")
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if hint is float or (hint == float | None and value is not None):
                # inf passes every range check below (rho >= 0, lr_max > lr_min) yet makes the step NaN.
                check(is_number(value) and math.isfinite(value), f.name, "must be a finite real number",
                      f"The default is {f.default!r}.")
        check(self.rho >= 0, "rho", "must be >= 0", "The paper uses 0.05; 0 turns the step into the base optimizer.")
        if self.rho_min is not None:
            check(0 <= self.rho_min <= self.rho, "rho_min", f"must lie in [0, {key}rho] = [0, {self.rho}]",
                  "Leave it unset (none) for a constant rho.")
        check(self.lr_min >= 0, "lr_min", "must be >= 0")
        if self.lr_max is not None:
            check(self.lr_max > self.lr_min, "lr_max", f"must be > {key}lr_min = {self.lr_min}",
                  "Leave it unset (none) for the optimizer's initial lr.")
        check(0 < self.beta <= 1, "beta", "must lie in (0, 1]",
              "ESAM perturbs each tensor with probability beta; 1 = all.")
        check(0 < self.gamma <= 1, "gamma", "must lie in (0, 1]", "ESAM keeps this fraction of the batch; 1 = all.")
        check(0 <= self.alpha <= 1, "alpha", "must lie in [0, 1]", "GSAM's paper uses 0.4; 0 gives plain SAM.")
        check(0 < self.keep_ratio <= 1, "keep_ratio", "must lie in (0, 1]",
              "It is the fraction of candidate entries perturbed (1 - the paper's sparsity); the paper uses 0.1.")
        check(isinstance(self.mask_interval, int) and not isinstance(self.mask_interval, bool)
              and self.mask_interval >= 1, "mask_interval", "must be an integer >= 1",
              "The paper rebuilds every 100 steps.")
        check(self.fisher_estimator in get_args(FisherEstimator), "fisher_estimator",
              f"must be one of {', '.join(get_args(FisherEstimator))}")
        check(self.non_candidates in get_args(NonCandidateMode), "non_candidates",
              f"must be one of {', '.join(get_args(NonCandidateMode))}")
        check(self.reuse in get_args(ReuseMode), "reuse", f"must be one of {', '.join(get_args(ReuseMode))}")
        check(self.reuse_alpha >= 0, "reuse_alpha", "must be >= 0", "0 reuses nothing.")
        check(self.eps > 0, "eps", "must be > 0")
        for pattern in self.candidate_exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise invalid_value(key + "candidate_exclude", pattern, f"is not a regular expression ({err})",
                                    "Escape special characters with a backslash.") from None
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an integer")
        try:
            self.schedule_rule
        except ValueError as err:
            check(False, "schedule", str(err), "For example: always, every:5, late:0.8, random:0.2, adaptive:1.0.")
        if self.uses_momentum:
            msam = f"{key}sam_type = {self.sam_type!r} takes one pass per step, at w + e"
            check(self.reuse == "none", "reuse", f"needs a second-pass gradient, which {msam}",
                  f"Set {key}reuse to none.")
            check(self.schedule_rule[0] != "adaptive", "schedule", f"decides from the first-pass ||g|| at w, which "
                  f"{msam} (e is applied before the pass)", "Use always, every:k, late:f or random:p.")
            check(not self.adaptive, "adaptive", f"scales the first-pass gradient by |w|; {msam} along the "
                  "momentum", f"Set {key}adaptive to false.")

    @property
    def schedule_rule(self) -> tuple[str, float]:
        """`schedule` parsed: (kind, its number; 0 for always). Raises ValueError saying what is wrong."""
        text = str(self.schedule).strip().lower()
        if text == "always":
            return "always", 0.0
        kind, _, number = text.partition(":")
        if kind not in SCHEDULES or kind == "always":
            raise ValueError(f"must be one of {', '.join(SCHEDULES)}, the last four with ':<number>'")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"needs a number after '{kind}:'") from None
        ok = {"every": value >= 1 and value.is_integer(), "late": 0 <= value <= 1, "random": 0 < value <= 1,
              "adaptive": math.isfinite(value)}[kind]
        if not ok:
            raise ValueError({"every": "needs an integer k >= 1 (every:k)", "late": "needs a fraction in [0, 1]",
                              "random": "needs a probability in (0, 1]", "adaptive": "needs a finite c"}[kind])
        return kind, value

    def is_candidate(self, name: str) -> bool:
        """Whether the tensor called `name` takes part in the Fisher top-k."""
        return not any(re.search(pattern, name) for pattern in self.candidate_exclude)

    def rho_at(self, lr: float, initial_lr: float) -> float:
        """The radius at learning rate `lr` (GSAM's lr-proportional schedule when rho_min is set)."""
        if self.rho_min is None:
            return self.rho
        lr_max = self.lr_max if self.lr_max is not None else initial_lr
        if lr_max <= self.lr_min:
            return self.rho
        fraction = min(max((lr - self.lr_min) / (lr_max - self.lr_min), 0.0), 1.0)
        return self.rho_min + (self.rho - self.rho_min) * fraction

