"""Hydra Sweeper plugin on current Optuna (the published hydra-optuna-sweeper pins optuna<3)."""
