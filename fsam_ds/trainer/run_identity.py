"""Which configuration keys define a run, and the short hash that names its default folder.

One rule for every key. A key either cannot change what the run trains or evaluates (where files
go, logging, checkpoint cadence, the dev batch size), may change when a run is resumed (those keys,
plus how long the run lasts and how often it is evaluated), or defines the run: everything else,
including every key added later, so a new setting is protected until someone decides otherwise.
The hash in the default output_dir covers all keys but the first group, so runs that differ in any
setting that can change their result land in different folders; resume refuses any difference in
the run-defining keys and applies the others.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["NO_EFFECT_ON_RESULTS", "SAFE_TO_CHANGE_ON_RESUME", "config_hash", "flatten_config", "run_differences"]

NO_EFFECT_ON_RESULTS = (
    "output_dir", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "max_consecutive_skipped",
    "data.num_workers", "data.eval_batch_size", "log.",  # a trailing dot means the whole section
)
"""Keys that change neither the trained weights nor the evaluations: left out of `config_hash`."""

SAFE_TO_CHANGE_ON_RESUME = NO_EFFECT_ON_RESULTS + ("optim.max_steps", "optim.epochs", "eval.")
"""Keys a resumed run takes from its new command line (extending a run, evaluating more often)."""


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """Nested config dict (`config_to_dict`, a config file's content) -> {dotted key: value}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _without(config: dict[str, Any], patterns: tuple[str, ...]) -> dict[str, Any]:
    """{dotted key: value} of `config` less the keys `patterns` name (a trailing dot: the whole section)."""
    return {k: v for k, v in flatten_config(config).items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in patterns)}


def config_hash(config: dict[str, Any]) -> str:
    """8 hex digits of sha256 over every key that can change the run's result (sorted JSON)."""
    text = json.dumps(_without(config, NO_EFFECT_ON_RESULTS), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def run_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for each run-defining key whose value differs (null where one side lacks it)."""
    before, after = _without(saved, SAFE_TO_CHANGE_ON_RESUME), _without(current, SAFE_TO_CHANGE_ON_RESUME)
    return [f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]
