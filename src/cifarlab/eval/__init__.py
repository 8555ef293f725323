"""Evaluation: metrics (incl. calibration), predicted probabilities with test-time augmentation,
scoring an interrupted run, and explanations (Grad-CAM)."""
