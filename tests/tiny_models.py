"""A tiny backbone installed as a real plugin, and untrained decoders on it: bundles in seconds, not minutes.

`tiny_plugin(folder)` writes an installed-looking distribution whose entry point is tests/tiny_backbone.py's
`tiny`, so every code path (export, both runtimes, train, subprocesses via PYTHONPATH) finds it the way it
finds a third-party plugin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).parent


@contextlib.contextmanager
def tiny_plugin(folder: Path) -> Iterator[Path]:
    """`tiny` registered in the capcli.backbones entry-point group while the context lasts."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "tiny_backbone.py", folder / "tiny_backbone.py")
    info = folder / "capcli_tinybackbone-0.0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: capcli-tinybackbone\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[capcli.backbones]\ntiny = tiny_backbone:tiny\n")
    old_path, old_env = list(sys.path), dict(os.environ)
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    os.environ.pop("CAPCLI_PLUGINS", None)
    try:
        yield folder
    finally:
        sys.path[:] = old_path
        for key in ("PYTHONPATH", "CAPCLI_PLUGINS"):
            if key in old_env:
                os.environ[key] = old_env[key]
            else:
                os.environ.pop(key, None)


def tiny_checkpoint(run: Path, dataset: Path, hidden_dim: int = 16, num_layers: int = 1, seed: int = 0,
                    extra_words: int = 0) -> Path:
    """An untrained decoder on the tiny backbone with the dataset's vocabulary: run/best.pt + run/config.json.

    Larger output weights give clear winners at each step, so both runtimes agree on every word.
    """
    import torch
    from tiny_backbone import tiny

    from capcli.data.readers import load_dataset
    from capcli.data.text import Vocabulary
    from capcli.model import checkpoint
    from capcli.model.pooled import CaptionDecoder, DecoderConfig
    from capcli.paths import atomic_write_json

    ds = load_dataset(str(dataset), seed=0)
    captions = [c for name in ds.splits["train"] for c in ds.captions[name]]
    captions += [f"extra{i}" for i in range(extra_words)]
    vocab = Vocabulary.build(captions, threshold=1)
    torch.manual_seed(seed)
    cfg = DecoderConfig(feature_dim=tiny.feature_dim, vocab_size=len(vocab), embed_dim=8, hidden_dim=hidden_dim,
                        num_layers=num_layers, dropout=0.0)
    decoder = CaptionDecoder(cfg)
    with torch.no_grad():
        decoder.out.weight.mul_(20)
    run.mkdir(parents=True, exist_ok=True)
    train_config = {"dataset": str(dataset), "images": None, "seed": 0, "backbone": "tiny"}
    checkpoint.save(run / "best.pt", {
        "config": cfg.to_dict(), "model": decoder.state_dict(), "vocab": vocab.to_json(),
        "vocab_sha256": vocab.sha256, "backbone": "tiny", "weights": "none", "feature_dim": tiny.feature_dim,
        "preprocessing": tiny.preprocessing.to_dict(), "max_len": 8, "dataset": str(dataset),
        "dataset_fingerprint": None, "train_config": train_config, "epoch": 0, "history": [],
    })
    atomic_write_json(run / "config.json", {"train": train_config, "model": cfg.to_dict()})
    return run


def tiny_env(tmp: Path, dataset: Path, exporter: str = "torchscript") -> dict[str, Path]:
    """Plugin folder, a tiny run and its bundle below `tmp` (call inside `tiny_plugin`)."""
    from capcli.bundle.build import export

    run = tiny_checkpoint(tmp / "run", dataset)
    bundle = export(run, tmp / "bundle", exporter=exporter)
    return {"run": run, "bundle": bundle}


def export_step(path: Path, vocab_size: int, hidden_dim: int = 16, num_layers: int = 1, seed: int = 1) -> Path:
    """A decoder.onnx of another (untrained) model, as a mix-up would bring into a bundle."""
    import torch

    from capcli.model.pooled import CaptionDecoder, DecoderConfig, DecoderStep

    torch.manual_seed(seed)
    cfg = DecoderConfig(feature_dim=8, vocab_size=vocab_size, embed_dim=8, hidden_dim=hidden_dim,
                        num_layers=num_layers, dropout=0.0)
    step = DecoderStep(CaptionDecoder(cfg).eval()).eval()
    args = (torch.ones(2, dtype=torch.long), torch.zeros(num_layers, 2, hidden_dim), torch.zeros(num_layers, 2,
                                                                                                   hidden_dim))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, args, str(path), dynamo=False, opset_version=18,
                          input_names=["tokens", "h", "c"], output_names=["log_probs", "h_out", "c_out"],
                          dynamic_axes={"tokens": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"}})
    return path


def rehash(bundle: Path, **changes) -> dict:
    """Rewrite capcli.json with `changes` and the sha256 of every file as it now is (a careful hand edit)."""
    import json

    from capcli.bundle.manifest import MANIFEST, sha256_file

    meta = json.loads((bundle / MANIFEST).read_text())
    meta.update(changes)
    meta["sha256"] = {name: sha256_file(bundle / name) for name in meta["sha256"] if (bundle / name).is_file()}
    (bundle / MANIFEST).write_text(json.dumps(meta))
    return meta
