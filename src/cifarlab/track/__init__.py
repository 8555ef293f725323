"""Experiment tracking: MLflow runs, metrics, artifacts and the logged model."""
