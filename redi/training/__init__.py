"""The training loop and everything a run folder holds: batching, metrics, guards, checkpoints."""
