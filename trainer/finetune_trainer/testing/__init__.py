"""Test helpers for finetune_trainer (test doubles; not used in production code paths)."""
