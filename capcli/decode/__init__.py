"""Greedy, beam and sampled decoding over a one-step decoder, shared by every runtime and both decoders.

A runtime (PyTorch, ONNX Runtime) only has to provide a step: feed one token per row with the recurrent
state and get the next token's log-probabilities and the new state. An attention decoder's step also
reads per-image context (the grid and its attention projection): arrays that are not recurrent state,
so they never change, but they are expanded to beams and re-indexed by parent rows alongside h and c
like the state; its step returns the attention weights it used, and every hypothesis keeps those of
its own path. Everything here is numpy, so captioning from an exported bundle never imports torch.
"""

from __future__ import annotations

from capcli.decode.beam import beam_search
from capcli.decode.constrained import constrained_beam_search
from capcli.decode.steps import Context, ContextStep, Hypothesis, State, Step, run_step
from capcli.decode.walk import greedy, sample

__all__ = ["Context", "ContextStep", "Hypothesis", "State", "Step", "beam_search", "constrained_beam_search", "greedy",
           "run_step", "sample"]
