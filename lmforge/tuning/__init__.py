"""Hyperparameter search over recipe fields (`lmforge tune`), driven by Optuna."""
