"""Evaluation: caption a split with either runtime and score it with the standard caption metrics.

Scores always come from generated captions, never teacher-forced ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from capcli.caption import caption_images, open_captioner
from capcli.console import progress
from capcli.errors import CapcliError
from capcli.paths import atomic_write_json


def model_dataset_defaults(model: str | Path) -> dict:
    """The dataset spec and split seed a bundle or run was trained with, when it says."""
    model = Path(model)
    if (model / "capcli.json").is_file():
        return json.loads((model / "capcli.json").read_text()).get("dataset", {})
    cfg = model / "config.json" if model.is_dir() else model.parent / "config.json"
    if cfg.is_file():
        train = json.loads(cfg.read_text())["train"]
        return {"spec": train["dataset"], "images": train.get("images"), "seed": train["seed"]}
    return {}


def synthetic_correctness(ds, candidates: dict[str, str]) -> dict[str, float] | None:
    """On the synthetic set, checkable truth: % of images whose caption names the main object's colour
    and shape right, and % whose every named (colour, shape) is drawn in the image."""
    from capcli.data.synthetic import caption_is_correct, load_objects, main_object_is_correct

    if not (ds.annotation.parent / "objects.json").is_file():
        return None
    objects = load_objects(ds.annotation.parent)
    judged = [(img, cap) for img, cap in candidates.items() if img in objects]
    if not judged:
        return None
    main = sum(main_object_is_correct(cap, objects[img]) for img, cap in judged)
    every = sum(caption_is_correct(cap, objects[img]) for img, cap in judged)
    return {"main_object": 100.0 * main / len(judged), "all_named": 100.0 * every / len(judged)}


def evaluate(
    model: str | Path,
    dataset: str | None = None,
    images: str | None = None,
    split: str = "test",
    beam_size: int = 3,
    runtime: str = "onnx",
    provider: str = "auto",
    device: str = "cpu",
    batch_size: int = 16,
    limit: int | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Caption `split` of the dataset and score it; writes captions and scores to `out` (JSON)."""
    from capcli.data.readers import load_dataset
    from capcli.metrics import score_captions

    defaults = model_dataset_defaults(model)
    dataset = dataset or defaults.get("spec")
    if not dataset:
        raise CapcliError("no --dataset given and the model does not record one")
    if images is None and dataset == defaults.get("spec"):
        images = defaults.get("images")
    seed = defaults.get("seed", 0) if seed is None else seed
    ds = load_dataset(dataset, images=images, seed=seed)
    if split not in ds.splits or not ds.splits[split]:
        raise CapcliError(f"dataset '{ds.name}' has no '{split}' split (has: {', '.join(ds.splits)})")
    names = ds.splits[split][:limit] if limit else ds.splits[split]
    captioner = open_captioner(model, runtime=runtime, provider=provider, device=device)
    with progress(transient=not show_progress) as bar:
        task = bar.add_task(f"caption {split}", total=len(names), info="")
        results = caption_images(captioner, [ds.image_path(n) for n in names], beam_size=beam_size,
                                 batch_size=batch_size, on_result=lambda r: bar.advance(task))
    by_path = {str(ds.image_path(n)): n for n in names}
    candidates = {by_path[r.image]: r.caption for r in results if r.error is None}
    failed = {by_path[r.image]: r.error for r in results if r.error is not None}
    if not candidates:
        raise CapcliError(f"no image of the {split} split could be captioned")
    scores = score_captions({n: ds.captions[n] for n in candidates}, candidates)
    report = {
        "model": str(model), "runtime": runtime, "dataset": ds.name, "split": split, "beam_size": beam_size,
        "images": len(candidates), "failed": failed, "scores": scores.values, "tokenizer": scores.tokenizer,
        "skipped": scores.skipped,
        "colour_shape_correct": synthetic_correctness(ds, candidates),
        "captions": [{"image": n, "caption": candidates[n], "references": ds.captions[n]} for n in candidates],
    }
    if out is None:
        base = Path(model) if Path(model).is_dir() else Path(model).parent
        out = base / f"evaluation-{split}.json"
    atomic_write_json(out, report)
    report["out"] = str(out)
    return report
