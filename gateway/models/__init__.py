"""Model repository: per-model config, ONNX Runtime sessions, versions and hot swaps."""
