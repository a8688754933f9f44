"""Checkpoints that carry everything needed to rebuild a decoder, loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from capcli.errors import CapcliError

FORMAT = "capcli-checkpoint/1"


def save(path: Path, payload: dict) -> None:
    """Atomic torch.save: temp file beside, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    tmp.replace(path)


def resolve(path: str | Path) -> Path:
    """A run directory (-> its best.pt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CapcliError(f"no checkpoint at '{path}' (give a run directory or a .pt file)")
    return path


def load(path: str | Path) -> dict:
    path = resolve(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CapcliError(f"cannot read checkpoint '{path}': {type(exc).__name__}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CapcliError(f"'{path}' is not a capcli checkpoint (format {FORMAT} expected)")
    _check_tail(ckpt, path)
    return ckpt


def _check_tail(ckpt: dict, path: Path) -> None:
    """A fine-tuned run's checkpoint carries its tuned tail ({"split", "state", ...}, `capcli.model.finetune`):
    one clear error when it is malformed, or missing from a run that was fine-tuned (its decoder reads the tuned
    tail's grid, and the untouched one would caption with the wrong features without a word)."""
    tail = ckpt.get("tail")
    if tail is None:
        config = ckpt.get("train_config")
        if isinstance(config, dict) and config.get("finetune"):
            raise CapcliError(f"'{path}' is of a fine-tuned run (--finetune) but holds no tuned tail: "
                              "the checkpoint is damaged")
        return
    if not (isinstance(tail, dict) and isinstance(tail.get("split"), str) and isinstance(tail.get("state"), dict)):
        raise CapcliError(f"'{path}' holds a malformed tuned tail (its 'tail' needs a split name and a state "
                          "dict): the checkpoint is damaged")


def build_decoder(ckpt: dict) -> torch.nn.Module:
    """The checkpoint's decoder (pooled or attention, as it records) with its weights, in eval mode."""
    from capcli.model import decoders

    return decoders.load(ckpt)


def check_matches(
    ckpt: dict, backbone_name: str, feature_dim: int, vocab_sha256: str | None = None, decoder: str | None = None
) -> None:
    """A clear error when a checkpoint meets a backbone, vocabulary or decoder kind it was not trained with."""
    from capcli.model import decoders

    if decoder is not None and decoders.kind_of(ckpt) != decoder:
        raise CapcliError(
            f"checkpoint was trained with the {decoders.kind_of(ckpt)} decoder, not {decoder}; "
            f"use --decoder {decoders.kind_of(ckpt)} or another --out"
        )
    if ckpt["backbone"] != backbone_name:
        raise CapcliError(
            f"checkpoint was trained on backbone '{ckpt['backbone']}', not '{backbone_name}'"
        )
    if ckpt["config"]["feature_dim"] != feature_dim:
        raise CapcliError(
            f"checkpoint expects {ckpt['config']['feature_dim']}-d features, backbone gives {feature_dim}"
        )
    if vocab_sha256 is not None and ckpt["vocab_sha256"] != vocab_sha256:
        raise CapcliError(
            "checkpoint vocabulary differs from this dataset's (vocab hash "
            f"{ckpt['vocab_sha256'][:12]} vs {vocab_sha256[:12]}); use the dataset and threshold it was trained on"
        )


def rng_state() -> dict:
    """Every random number generator a training process uses, in a form weights_only loading accepts."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Put back what `rng_state` saved, so a resumed run draws what an uninterrupted one would."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
