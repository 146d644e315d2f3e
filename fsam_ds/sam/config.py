"""Configuration of the sharpness-aware step, validated at construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Literal

SAM_TYPES = ("sam", "esam", "gsam", "fisher-sam", "fisher-esam", "fisher-gsam")
FISHER_ESTIMATORS = ("batch", "accumulated")
NON_CANDIDATE_MODES = ("dense", "none")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field, the value and the fix."""


def _fail(field: str, value: object, allowed: str, hint: str = "") -> None:
    message = f"SAMConfig.{field} = {value!r} is invalid: {allowed}."
    if hint:
        message += f" {hint}"
    raise ConfigError(message)


@dataclass(frozen=True)
class SAMConfig:
    """Everything that defines one sharpness-aware (SAM-family) step.

    The defaults are those of the FSAM paper's code (rho 0.05, keep_ratio 0.1, mask every 100
    steps, ESAM beta = gamma = 0.5, GSAM alpha 0.4), with its defects fixed (see README).
    """

    sam_type: Literal["sam", "esam", "gsam", "fisher-sam", "fisher-esam", "fisher-gsam"] = "fisher-sam"
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
    fisher_estimator: Literal["batch", "accumulated"] = "batch"
    """'batch': g^2 of the rebuild step's batch (the paper's code). 'accumulated': sum of g^2 over
    every first pass since the previous rebuild (costs one fp32 buffer per candidate entry)."""
    non_candidates: Literal["dense", "none"] = "dense"
    """Tensors outside the candidate set are perturbed densely (the paper's code) or not at all."""
    renormalize: bool = False
    """If true, the masked perturbation is rescaled so that ||e|| = rho exactly."""
    adaptive: bool = False
    """ASAM: scale the ascent direction elementwise by |w| (Kwon et al. 2021)."""
    eps: float = 1e-12
    """Added to norms before dividing."""
    seed: int = 0
    """Seed of the generator behind ESAM's random tensor subset (identical on every rank)."""

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

    def validate(self) -> None:
        if self.sam_type not in SAM_TYPES:
            _fail("sam_type", self.sam_type, f"must be one of {', '.join(SAM_TYPES)}")
        for name in ("rho", "beta", "gamma", "alpha", "keep_ratio", "eps", "lr_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                _fail(name, value, "must be a real number")
        if self.rho < 0:
            _fail("rho", self.rho, "must be >= 0", "The paper uses 0.05; 0 turns the step into the base optimizer.")
        if self.rho_min is not None and not (0 <= self.rho_min <= self.rho):
            _fail("rho_min", self.rho_min, f"must lie in [0, rho] = [0, {self.rho}]", "Use None for a constant rho.")
        if self.lr_min < 0:
            _fail("lr_min", self.lr_min, "must be >= 0")
        if self.lr_max is not None and not self.lr_max > self.lr_min:
            _fail("lr_max", self.lr_max, f"must be > lr_min = {self.lr_min}", "Use None for the optimizer's initial lr.")
        if not 0 < self.beta <= 1:
            _fail("beta", self.beta, "must lie in (0, 1]", "ESAM perturbs each tensor with probability beta; 1 = all.")
        if not 0 < self.gamma <= 1:
            _fail("gamma", self.gamma, "must lie in (0, 1]", "ESAM keeps this fraction of the batch; 1 = all.")
        if not 0 <= self.alpha <= 1:
            _fail("alpha", self.alpha, "must lie in [0, 1]", "GSAM's paper uses 0.4; 0 gives plain SAM.")
        if not 0 < self.keep_ratio <= 1:
            _fail("keep_ratio", self.keep_ratio, "must lie in (0, 1]",
                  "It is the fraction of candidate entries perturbed (1 - the paper's sparsity); the paper uses 0.1.")
        if isinstance(self.mask_interval, bool) or not isinstance(self.mask_interval, int) or self.mask_interval < 1:
            _fail("mask_interval", self.mask_interval, "must be an integer >= 1", "The paper rebuilds every 100 steps.")
        if self.fisher_estimator not in FISHER_ESTIMATORS:
            _fail("fisher_estimator", self.fisher_estimator, f"must be one of {', '.join(FISHER_ESTIMATORS)}")
        if self.non_candidates not in NON_CANDIDATE_MODES:
            _fail("non_candidates", self.non_candidates, f"must be one of {', '.join(NON_CANDIDATE_MODES)}")
        if not self.eps > 0:
            _fail("eps", self.eps, "must be > 0")
        for pattern in self.candidate_exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                _fail("candidate_exclude", pattern, f"each entry must be a regular expression ({err})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "must be an integer")

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

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
