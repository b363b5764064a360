"""Training: the loop, the tasks (loss, evaluation, metrics), signals, progress and trackers."""
