"""The training loop and what it plugs together: batches, optimizer, schedule, checkpoints, metrics."""
