"""`capcli serve`: a bundle behind an HTTP API and a web page (FastAPI + uvicorn, micro-batched ONNX Runtime).

A front end like the CLI: it uses the pipeline (capcli.runtime.captioner, capcli.images), never the CLI or the demo.
"""
