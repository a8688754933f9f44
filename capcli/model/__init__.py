"""The networks: the pooled and the attention LSTM decoder, building one from its config, checkpoints, and the
one-step wrappers that decoding and export use. Importing this package does not import torch."""

DECODER_KINDS = ("pooled", "attention")  # the pooled decoder reads one vector per image, attention the grid
