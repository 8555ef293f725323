"""One callback a file, each on the events of training/events.py: ema, lookahead, early_stopping,
replan (--budget), feature_cache, checkpoints, history, tracking, console."""
