"""Experiment configs (ml_collections). `base.py` is the full schema; variants override fields."""
