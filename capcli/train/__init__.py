"""Training a decoder on cached features: the cross-entropy loop (loop.py) and self-critical training (scst.py),
with the options, batching, distributed and run-folder code they share."""
