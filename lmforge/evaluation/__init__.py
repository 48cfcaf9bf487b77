"""Evaluation: loss, perplexity and bits per byte; samples; the run's report."""
