"""`python -m fsam_ds.train` / `deepspeed --module fsam_ds.train`: the trainer's stable module path,
which launch scripts, wandb sweep specs and cluster job files name. The command is `fsam_ds.cli.train`."""

from fsam_ds.cli.train import main

if __name__ == "__main__":
    main()
