"""Drafter training: prompt sources, self-distillation data and training loops."""
