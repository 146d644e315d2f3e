"""A task's data: read from files or the hub, checked against its task, tokenized and batched."""
