"""Evaluation: caption a split with either runtime and score it with the standard caption metrics.

Scores always come from generated captions, never teacher-forced ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from capcli.console import progress, warn
from capcli.errors import CapcliError
from capcli.guidance import GuideOptions
from capcli.paths import atomic_write_json, is_bundle_folder, protected_output, same_file_as_any, starts_with
from capcli.runtime.captioner import (
    DEFAULT_GUARDS,
    DEFAULT_GUIDANCE,
    MAX_BEAM,
    Guards,
    caption_images,
    open_captioner,
)


def model_dataset_defaults(model: str | Path) -> dict:
    """The dataset spec and split seed a bundle or run was trained with, when it says."""
    from capcli.bundle.manifest import MANIFEST, read_manifest

    model = Path(model)
    if (model / MANIFEST).is_file():
        return read_manifest(model, verify=False).get("dataset", {})
    cfg = model / "config.json" if model.is_dir() else model.parent / "config.json"
    if cfg.is_file():
        try:
            train = json.loads(cfg.read_text(encoding="utf-8"))["train"]
            return {"spec": train["dataset"], "images": train.get("images"), "seed": train["seed"]}
        except (OSError, ValueError, KeyError, TypeError):
            raise CapcliError(f"{cfg}: unreadable run config; pass --dataset") from None
    return {}


def default_output(model: str | Path, split: str) -> Path:
    """evaluation-MODEL-SPLIT.json in the current folder: never inside the bundle, which may be read-only
    or shared, and whose files export --force replaces."""
    model = Path(model).resolve()
    name = model.name if model.is_dir() else model.parent.name
    return Path(f"evaluation-{name}-{split}.json")


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
    allow_missing: bool = False,
    meteor: bool | None = None,
    force: bool = False,
    guards: Guards = DEFAULT_GUARDS,
    guidance: GuideOptions = DEFAULT_GUIDANCE,
) -> dict:
    """Caption `split` of the dataset and score it; writes captions and scores to `out` (JSON).

    meteor: as `capcli.metrics.score_captions` (None: when java is present).

    Every image of the split (or the first `limit`) must be captioned: missing images stop it before any
    captioning, unreadable ones after the report is written, unless `allow_missing` (then the rest is
    scored and the report lists what was left out).
    """
    from capcli.data.readers import dataset_files, image_of, load_dataset
    from capcli.metrics import score_captions

    if limit is not None and limit < 1:
        raise CapcliError(f"--limit must be at least 1, got {limit}")
    if not 1 <= beam_size <= MAX_BEAM:
        raise CapcliError(f"--beam-size must be from 1 to {MAX_BEAM}, got {beam_size}")
    out = _output_path(model, out, split, force)  # before any work
    defaults = model_dataset_defaults(model)
    dataset = dataset or defaults.get("spec")
    if not dataset:
        raise CapcliError("no --dataset given and the model does not record one")
    if images is None and dataset == defaults.get("spec"):
        images = defaults.get("images")
    seed = defaults.get("seed", 0) if seed is None else seed
    ds = load_dataset(dataset, images=images, seed=seed)
    trained_on = defaults.get("fingerprint")
    if dataset == defaults.get("spec") and trained_on and ds.fingerprint() != trained_on:
        warn(f"{dataset} is not the data the model was trained on (its captions changed since: fingerprint "
             f"{ds.fingerprint()}, the model's {trained_on}); its {split} split is scored as it is now")
    if split not in ds.splits or not ds.splits[split]:
        raise CapcliError(f"dataset '{ds.name}' has no '{split}' split (has: {', '.join(ds.splits)})")
    names = ds.splits[split][:limit] if limit else ds.splits[split]
    read = same_file_as_any(out, dataset_files(ds))
    if read is not None or image_of(ds, out) is not None:
        what = f"{Path(read).name}, a file" if read is not None else "an image"
        raise CapcliError(f"--out '{out}' is an input of this command ({what} of the dataset '{ds.name}'); choose "
                          "another path")
    protected_output(out, "--out", inputs=[ds.image_path(n) for n in names], force=force, ours=is_evaluation)
    missing = [n for n in names if not ds.image_path(n).is_file()]
    if missing:
        _refuse_or_warn(f"{len(missing)} of {len(names)} images of the {split} split are missing from "
                        f"{ds.images_dir} (first: {missing[0]}); pass --images DIR where they are", allow_missing)
        names = [n for n in names if n not in set(missing)]
        if not names:
            raise CapcliError(f"none of the {split} split's images is in {ds.images_dir}; pass --images DIR")
    captioner = open_captioner(model, runtime=runtime, provider=provider, device=device)
    with progress(transient=not show_progress) as bar:
        task = bar.add_task(f"caption {split}", total=len(names), info="")
        results = caption_images(captioner, [ds.image_path(n) for n in names], beam_size=beam_size,
                                 batch_size=batch_size, on_result=lambda r: bar.advance(task), guards=guards,
                                 guidance=guidance)
    by_path = {str(ds.image_path(n)): n for n in names}
    candidates = {by_path[r.image]: r.caption for r in results if r.error is None}
    failed = {by_path[r.image]: r.error for r in results if r.error is not None}
    classes = {by_path[r.image]: r.classes.to_json() for r in results if r.classes is not None}
    if not candidates:
        raise CapcliError(f"no image of the {split} split could be captioned")
    scores = score_captions({n: ds.captions[n] for n in candidates}, candidates, meteor=meteor)
    report = {
        "model": str(model), "runtime": runtime, "dataset": ds.name, "split": split, "beam_size": beam_size,
        "guards": {"suppress_unk": guards.suppress_unk, "no_repeat_ngram": guards.no_repeat_ngram},
        "guidance": guidance.enabled and getattr(captioner, "classifier", None) is not None,
        "constrain": guidance.enabled and guidance.constrain and getattr(captioner, "classifier", None) is not None,
        "images": len(candidates), "split_images": len(ds.splits[split]), "limit": limit,
        "missing": missing, "failed": failed, "scores": scores.values, "tokenizer": scores.tokenizer,
        "skipped": scores.skipped,
        "colour_shape_correct": synthetic_correctness(ds, candidates),
        "captions": [{"image": n, "caption": candidates[n], "references": ds.captions[n],
                      **({"classes": classes[n]} if n in classes else {})} for n in candidates],
    }
    atomic_write_json(out, report)
    report["out"] = str(out)
    if failed:
        _refuse_or_warn(f"{len(failed)} of {len(names)} images could not be captioned (listed under 'failed' "
                        f"in {out}; first: {next(iter(failed.values()))})", allow_missing)
    return report


def _output_path(model: str | Path, out: str | Path | None, split: str, force: bool) -> Path:
    """The report's path, refused inside any bundle (its files are hashed, shared or read-only) and where
    writing it would replace the model's files or a file capcli did not write."""
    path = Path(out) if out is not None else default_output(model, split)
    folder = path.absolute().parent
    if is_bundle_folder(folder):
        hint = "" if out is not None else " (the default, in the current folder)"
        raise CapcliError(f"--out '{path}'{hint} is inside the bundle '{folder}'; evaluation is never written "
                          "in a bundle: pass --out PATH outside it")
    model = Path(model)
    return protected_output(path, "--out", inputs=[model] if model.is_file() else [], force=force,
                            ours=is_evaluation)


def is_evaluation(path: Path) -> bool:
    """Whether the file at `path` is an evaluation report capcli wrote (json.dumps(indent=2) of `evaluate`)."""
    return starts_with(path, b'{\n  "model": ', b'\n  "runtime": ', b'\n  "split": ')


def _refuse_or_warn(problem: str, allow_missing: bool) -> None:
    if not allow_missing:
        raise CapcliError(f"{problem}; or --allow-missing to score the rest")
    warn(f"{problem}; scoring the rest (--allow-missing)")
