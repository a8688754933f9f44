"""capcli: train CNN+LSTM image-captioning models, export them to ONNX, caption with ONNX Runtime."""

__version__ = "0.1.0"
