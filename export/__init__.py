"""Models and their export to on-device artifacts (ExecuTorch .pte, ONNX, manifest)."""
