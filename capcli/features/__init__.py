"""Features: images through a backbone into a resumable float16 cache (cache.py), the extraction itself
(extraction.py) and its engines, PyTorch or ONNX Runtime on an exported backbone graph (engines.py)."""
