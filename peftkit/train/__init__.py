"""Training: a recipe's run on transformers' Trainer, checkpoints, launch checks, AdaLoraCallback,
starting from stored adapters."""
