"""Captioning from a bundle or a run: ONNX Runtime (no torch) or PyTorch, behind one captioner interface."""
