"""The SAM family's math, configuration and plain-PyTorch optimizer; imports torch only."""

from fsam_ds.sam.config import SAM_TYPES, ConfigError, SAMConfig
from fsam_ds.sam.optim import SAMOptimizer

__all__ = ["SAM_TYPES", "ConfigError", "SAMConfig", "SAMOptimizer"]
