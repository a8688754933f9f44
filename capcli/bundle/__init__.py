"""Bundles: the manifest (schema.py, manifest.py, onnx_files.py), a checkpoint exported to a float bundle
(export.py), a float bundle made int8 or float16-stored (quantize.py, float16.py, judge.py), and `capcli export` as
one staged step (build.py)."""
