"""Evaluation: `python -m pipeline.eval zeroshot ...` (zero-shot classification on local labelled datasets)."""
