"""The SAM family inside Hugging Face's Trainer under --deepspeed, and in your own accelerate loop. Imports
`fsam_ds.sam` and `fsam_ds.zero`, never the trainer."""

from fsam_ds.hf.accelerator import accumulation_windows, sam_engine_from_accelerator
from fsam_ds.hf.trainer import SAMArguments, SAMTrainer, SAMTrainerMixin, sam_trainer
from fsam_ds.sam.config import SAMConfig

__all__ = ["SAMArguments", "SAMConfig", "SAMTrainer", "SAMTrainerMixin", "accumulation_windows",
           "sam_engine_from_accelerator", "sam_trainer"]
