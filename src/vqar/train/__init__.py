"""Training: one loop (`loop.Trainer`) that both stages plug a `TrainTask` (`task.py`) into."""
