"""Deployment: predictors (PyTorch, ONNX Runtime), verified export, the prediction service."""
