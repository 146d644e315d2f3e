"""fsam-ds: Fisher-mask SAM and the SAM family, in plain PyTorch and on DeepSpeed ZeRO 0-3."""

from fsam_ds.config import ConfigError, SAMConfig
from fsam_ds.engine import SAMEngine, initialize
from fsam_ds.optim import SAMOptimizer

__all__ = ["ConfigError", "SAMConfig", "SAMEngine", "SAMOptimizer", "initialize"]
__version__ = "0.1.0"
