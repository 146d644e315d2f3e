"""`python -m fsam_ds ...` runs the trainer, like fsam-train."""

from fsam_ds.cli.train import main

if __name__ == "__main__":
    main()
