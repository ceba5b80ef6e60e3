"""Data path: tokenizer -> sources -> mixture -> packer -> dataloader."""
