"""The fine-tuning run: configuration, tasks, data, evaluation, checkpoints, metrics log and loop."""
