"""Evaluation: kiln as an lm-evaluation-harness model (harness.py), running tasks (tasks.py), tasks during
training (training.py), named held-out sets (heldout.py). Only harness, tasks and training import lm-eval."""
