"""Converted bundles (int8, float16-stored): judged by their captions, then installed in place of the float graphs.

Judging: a sample of validation images is captioned with the float graphs
and with the converted ones (int8, float16-stored); the share of identical captions and the change in BLEU-4 /
CIDEr-D are what a user cares about, and a conversion that loses more than the tolerance is refused.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capcli.backbone import Preprocessing
from capcli.errors import CapcliError
from capcli.runtime.captioner import caption_images

DEFAULT_PARITY_IMAGES = 200  # validation images captioned by both bundles
PARITY_BEAM = 3  # captions are compared as `capcli caption` makes them by default:
PARITY_BATCH = 8  # beam 3, 8 images decoded together (the int8 decoder's rounding depends on the batch)
GRAPH_FILES = ("encoder.onnx", "decoder.onnx")


@dataclass(frozen=True)
class Tolerance:
    """What an int8 bundle may lose against the float one on the validation sample."""

    min_agreement: float = 90.0  # % of images whose caption is identical
    max_cider_loss: float = 3.0  # % of the float bundle's CIDEr-D

    def describe(self) -> str:
        return f"captions agree >= {self.min_agreement:g}%, CIDEr-D loss <= {self.max_cider_loss:g}%"


def run_dataset(meta: dict):
    """The dataset a bundle's model was trained on, split as it was (the manifest's `dataset`)."""
    from capcli.data.readers import load_dataset

    ds = meta["dataset"]
    try:
        return load_dataset(ds["spec"], images=ds.get("images"), seed=ds.get("seed") or 0)
    except CapcliError as exc:
        raise CapcliError(f"cannot find the run's dataset to quantize with ({exc})") from None


def parity_sample(ds, count: int) -> list[str]:
    """The first `count` readable validation images (the test split when there is no validation split)."""
    split = ds.splits.get("val") or ds.splits.get("test") or []
    names = [n for n in split if ds.image_path(n).is_file()][:count]
    if len(names) < 2:
        raise CapcliError("the run's dataset has too few validation images to judge an int8 bundle")
    return names


class GraphCaptioner:
    """A captioner over an encoder and a step graph on ONNX Runtime's CPU provider (see capcli.runtime.captioner).

    `context` names the encoder outputs an attention step also reads (empty for a pooled decoder)."""

    state_batch_axes = (1, 1)  # h and c are [layers, batch, hidden]
    grid = None  # attention maps are not compared

    def __init__(self, encoder: Path, decoder: Path, vocab, prep: Preprocessing, max_len: int,
                 context: tuple[str, ...] = ()):
        import onnxruntime as ort

        from capcli.runtime.onnx_runtime import OnnxStep

        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(encoder), providers=providers)
        self.output_names = [o.name for o in self.encoder.get_outputs()]
        self.context_names = tuple(context)
        self.step = OnnxStep(ort.InferenceSession(str(decoder), providers=providers), decoder.name,
                             self.context_names)
        self.vocab, self.preprocessing, self.max_len = vocab, prep, max_len

    def start(self, images: np.ndarray):
        outputs = dict(zip(self.output_names, self.encoder.run(None, {"images": images.astype(np.float32)}),
                           strict=True))
        return (outputs["h0"], outputs["c0"]), tuple(outputs[n] for n in self.context_names)

    def encode(self, images: np.ndarray):
        return self.start(images)[0]


def caption_sample(captioner, ds, names: list[str]) -> dict[str, str]:

    results = caption_images(captioner, [ds.image_path(n) for n in names], beam_size=PARITY_BEAM,
                             batch_size=PARITY_BATCH)
    return {n: r.caption or "" for n, r in zip(names, results, strict=True) if r.error is None}


def caption_parity(ds, float_caps: dict[str, str], int8_caps: dict[str, str], label: str = "int8") -> dict:
    """Agreement % and BLEU-4 / CIDEr-D of both bundles' captions against the references (the second's under
    `label`, the mode)."""
    from capcli.metrics import score_captions

    names = [n for n in float_caps if n in int8_caps]
    refs = {n: ds.captions[n] for n in names}
    scores = {}
    for name, caps in (("float32", float_caps), (label, int8_caps)):
        s = score_captions(refs, {n: caps[n] for n in names}, meteor=False, tokenizer="simple").values
        scores[name] = {"BLEU-4": s["BLEU-4"], "CIDEr-D": s["CIDEr-D"]}
    cider_f, cider_q = scores["float32"]["CIDEr-D"], scores[label]["CIDEr-D"]
    return {
        "images": len(names),
        "beam_size": PARITY_BEAM,
        "tokenizer": "simple",
        "agreement_percent": 100.0 * sum(float_caps[n] == int8_caps[n] for n in names) / len(names),
        "scores": scores,
        "cider_loss_percent": 100.0 * (cider_f - cider_q) / cider_f if cider_f > 0 else 0.0,
        "bleu4_difference": scores[label]["BLEU-4"] - scores["float32"]["BLEU-4"],
    }


def verdict(parity: dict, tolerance: Tolerance, label: str = "int8") -> str | None:
    """Why the int8 (or float16) bundle is refused, or None when it is within tolerance."""
    agreement, loss = parity["agreement_percent"], parity["cider_loss_percent"]
    if agreement >= tolerance.min_agreement and loss <= tolerance.max_cider_loss:
        return None
    s = parity["scores"]
    return (
        f"the {label} bundle loses too much on {parity['images']} validation images: captions agree "
        f"{agreement:.1f}%, CIDEr-D {s[label]['CIDEr-D']:.1f} vs {s['float32']['CIDEr-D']:.1f} float "
        f"({0.0 - loss:+.1f}%); "
        f"tolerance: {tolerance.describe()}; bundle not written"
    )


def replace_if_close(folder: Path, work: Path, meta: dict, vocab, tolerance: Tolerance, label: str,
                     parity_images: int = DEFAULT_PARITY_IMAGES) -> tuple[dict, dict]:
    """Caption the validation sample with `folder`'s float graphs and with the converted ones in `work`; refuse
    (CapcliError, `folder` unchanged) beyond `tolerance`, else move the converted graphs into `folder`.
    Returns the caption parity and the graphs' bytes before and after (under "float32" and `label`)."""
    ds = run_dataset(meta)
    sample = parity_sample(ds, parity_images)
    prep, max_len = Preprocessing.from_dict(meta["preprocessing"]), int(meta["max_len"])
    context = tuple(meta["io"]["context"])
    enc, dec = folder / "encoder.onnx", folder / "decoder.onnx"
    float_caps = caption_sample(GraphCaptioner(enc, dec, vocab, prep, max_len, context), ds, sample)
    new_caps = caption_sample(
        GraphCaptioner(work / "encoder.onnx", work / "decoder.onnx", vocab, prep, max_len, context), ds, sample)
    parity = caption_parity(ds, float_caps, new_caps, label=label)
    refusal = verdict(parity, tolerance, label=label)
    if refusal:
        raise CapcliError(refusal)
    sizes = {"float32": enc.stat().st_size + dec.stat().st_size}
    for name in GRAPH_FILES:
        os.replace(work / name, folder / name)
    sizes[label] = enc.stat().st_size + dec.stat().st_size
    return parity, sizes


@contextlib.contextmanager
def converter_errors(name: str):
    """The quantizer's own failures (a graph it cannot handle, no readable calibration image) as one line."""
    try:
        yield
    except (OSError, CapcliError):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise CapcliError(f"cannot convert {name}: {type(exc).__name__}: {lines[0][:200] if lines else ''}; "
                          "bundle not written") from None
