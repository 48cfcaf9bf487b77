"""Sizing a run before training it: model size and training tokens for a budget (`lmforge plan`)."""
