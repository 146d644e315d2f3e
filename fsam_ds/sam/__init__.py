"""The SAM family's math, configuration and plain-PyTorch optimizer; imports torch only."""

from fsam_ds.sam.config import MSAM_TYPES, SAM_TYPES, ConfigError, SAMConfig
from fsam_ds.sam.optim import SAMOptimizer

__all__ = ["MSAM_TYPES", "SAM_TYPES", "ConfigError", "SAMConfig", "SAMOptimizer"]
