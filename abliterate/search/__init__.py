"""Automatic plan search: trials of candidate plans applied in memory, scored on refusals and KL, an Optuna study."""
