"""The SAM family inside Hugging Face's Trainer under --deepspeed. Imports `fsam_ds.sam` and
`fsam_ds.zero`, never the trainer."""

from fsam_ds.hf.trainer import SAMArguments, SAMTrainer, SAMTrainerMixin, sam_trainer
from fsam_ds.sam.config import SAMConfig

__all__ = ["SAMArguments", "SAMConfig", "SAMTrainer", "SAMTrainerMixin", "sam_trainer"]
