"""Self-critical sequence training (Rennie et al. 2017): fine-tune a cross-entropy run on CIDEr-D itself.

Per batch of training images: draw k captions per image from the decoder (`capcli.train.rollout`, in torch on
the training device), reward each with CIDEr-D against that image's references (`capcli.train.cider`, document
frequencies of the training references), subtract a baseline and step the policy gradient, the mean over
generated tokens (<end> included) of -(reward - baseline) * log p. Baselines:
- "greedy" (the paper's): the reward of the model's own greedy caption for the image, so only samples
  that beat what the model would say at test time are made likelier;
- "mean" (newer work, no extra decode): the mean reward of the image's other k-1 samples.
Dropout is off throughout: the policy sampled, the greedy baseline and the captions judged on validation
are all the model that gets exported. A fresh Adam at a small learning rate starts from the weights.

The run folder, after `capcli scst RUN`:
- best_xe.pt: the cross-entropy best, copied from best.pt once, when the first SCST epoch is saved and
  before anything else is written (an SCST stopped before that leaves the run as it was); SCST always
  starts from it, and it is never replaced.
- best.pt: what `capcli export RUN` exports. It stays the cross-entropy best until an SCST epoch's val
  CIDEr-D of greedy captions beats the cross-entropy model's on the same validation images; from then on
  it is SCST's best epoch (same checkpoint format, with "stage": "scst").
- scst/last.pt: the state after the last finished epoch (weights, optimizer, history, random-number
  states); rerunning the command continues from it, with its own settings (--epochs and --patience unless
  given anew; the dataset where --dataset last said it is). scst/metrics.jsonl and .csv: one row per epoch.
Model selection and early stopping (`patience` epochs without a better val CIDEr-D) use greedy captions
of `val_sample` validation images, the same on every epoch. Under torchrun every rank takes its share of
each epoch's images and the gradients are averaged over ranks; only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from capcli.console import err, progress
from capcli.devices import matmul_dtype
from capcli.errors import CapcliError
from capcli.model import checkpoint, decoders
from capcli.paths import atomic_write_bytes
from capcli.train.batches import TunedGrids, batches_for_rank, feature_source
from capcli.train.captions import encode_split
from capcli.train.distributed import (
    all_equal_checksums,
    barrier,
    gather_rng_states,
    mean_over_ranks,
    restore_rng_states,
    setup_distributed,
)
from capcli.train.rollout import rollout
from capcli.train.run_folder import write_metrics

BASELINES = ("greedy", "mean")
MAX_IMAGES, MAX_SAMPLES = 1024, 64  # images per step and captions sampled per image: a step rolls out both at once
# Options a continued SCST run may change: how long and where it runs, not what it learns.
CHANGEABLE_ON_RESUME = frozenset({"run", "epochs", "patience", "device", "workers", "given", "dataset", "images"})
# Of those, what a continued run takes from its saved settings unless given anew: it finishes the job as started,
# on the data it was started on.
KEPT_UNLESS_GIVEN = ("epochs", "patience", "dataset", "images")


@dataclass
class ScstConfig:
    run: str  # a cross-entropy run folder (best.pt)
    epochs: int = 10  # SCST epochs in all (a continued run may raise it)
    samples: int = 5  # captions sampled per image
    baseline: str = "greedy"  # "greedy" or "mean"
    lr: float = 5e-5
    batch_size: int = 16  # images per step (x samples captions)
    patience: int = 3
    val_sample: int = 1000  # validation images captioned (greedy) per epoch; the whole split when smaller
    seed: int | None = None  # None: the run's
    device: str = "auto"
    workers: int | None = None  # feature extraction, when the cache has to be made again
    dataset: str | None = None  # where the run's dataset is now (None: where the run records it)
    images: str | None = None  # its image folder, when apart from the annotations (None: the run's, or beside them)
    given: tuple[str, ...] | None = None  # the options the user set (the CLI fills it); None: those not default

    def validate(self) -> None:
        """CapcliError naming every bad option in one line."""
        bad = []

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                bad.append(f"--{name.replace('_', '-')} must be {what} (got {getattr(self, name)!r})")

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("epochs", "patience", "val_sample"):
            need(integer(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer of at least 1")
        for name, most in (("batch_size", MAX_IMAGES), ("samples", MAX_SAMPLES)):  # a step is images x samples
            value = getattr(self, name)
            need(integer(value) and 1 <= value <= most, name, f"an integer from 1 to {most}")
        need(self.baseline in BASELINES, "baseline", " or ".join(BASELINES))
        if self.baseline == "mean" and integer(self.samples) and self.samples == 1:
            bad.append("--samples must be at least 2 with --baseline mean (the other samples are the baseline)")
        need(isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0, "lr",
             "a finite number above 0")
        need(self.seed is None or (integer(self.seed) and 0 <= self.seed < 2**31), "seed",
             "an integer from 0 to 2147483647")
        need(self.workers is None or (integer(self.workers) and self.workers >= 0), "workers",
             "an integer of at least 0")
        if bad:
            raise CapcliError("invalid SCST options: " + "; ".join(bad))


def cross_entropy_checkpoint(run: Path) -> Path:
    """The run's cross-entropy best: best_xe.pt once SCST has started, before that best.pt."""
    if not run.is_dir():
        raise CapcliError(f"no run folder at '{run}': SCST fine-tunes a cross-entropy run (capcli train --out RUN)")
    for name in ("best_xe.pt", "best.pt"):
        path = run / name
        if path.is_file() and checkpoint.load(path).get("stage", "xe") == "xe":
            return path
    raise CapcliError(f"'{run}' has no cross-entropy checkpoint (best.pt): train it first with "
                      f"capcli train --out {run}, then run SCST on it")


def settings_to_continue(cfg: ScstConfig, saved: dict) -> ScstConfig:
    """`cfg` with the saved SCST run's settings; CapcliError if an option the user gave conflicts."""
    from capcli.train.config import explicitly_given

    given = explicitly_given(cfg)  # the CLI's record, or (from Python) the options not at their defaults
    fixed = [f.name for f in fields(cfg) if f.name not in CHANGEABLE_ON_RESUME and f.name in saved]
    conflicts = [f"--{n.replace('_', '-')} {getattr(cfg, n)!r} (it has {saved[n]!r})" for n in fixed
                 if n in given and getattr(cfg, n) is not None and getattr(cfg, n) != saved[n]]
    if conflicts:
        raise CapcliError(f"SCST in '{cfg.run}' was started with other settings: {'; '.join(conflicts)}. Drop "
                          f"them to continue it, or delete {Path(cfg.run) / 'scst'} to start SCST over")
    kept = {n: saved[n] for n in KEPT_UNLESS_GIVEN if n in saved and n not in given}
    return replace(cfg, **{n: saved[n] for n in fixed}, **kept)


def run_dataset(cfg: ScstConfig, xe: dict):
    """The run's dataset: where --dataset (and --images) say it is now, else where the run records it; refused
    unless it is the data the run was trained on (a set replaced since, or another folder, would be trained on
    silently: its vocabulary may even match)."""
    from capcli.data.readers import load_dataset

    tc = xe["train_config"]
    spec = cfg.dataset or tc["dataset"]
    images = cfg.images if cfg.images is not None or cfg.dataset is not None else tc.get("images")
    try:
        ds = load_dataset(spec, images=images, seed=tc.get("seed", 0))
    except CapcliError as exc:
        if cfg.dataset is not None or cfg.images is not None:
            raise
        raise CapcliError(f"the run's dataset cannot be read from here ({exc}); pass --dataset (and --images) "
                          "where it is now") from None
    trained_on = xe.get("dataset_fingerprint")
    if trained_on and ds.fingerprint() != trained_on:
        raise CapcliError(f"{spec} is not the dataset the run was trained on (its captions differ: fingerprint "
                          f"{ds.fingerprint()}, the run's {trained_on}); pass --dataset with the run's own")
    return ds


@torch.no_grad()
def greedy_scores(decoder, table, feats, row_of: dict, vocab, max_len: int, sample: int, batch: int = 250) -> dict:
    """BLEU-4 and CIDEr-D (0-100) of greedy captions of the first `sample` images of `table`, with the
    failure modes of SCST in view: share of distinct captions, and mean length beside the references'."""
    from capcli.metrics import score_captions, simple_tokenize

    decoder.eval()
    images = table.images[:sample]
    captions: list[str] = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        out = rollout(decoder, feats.images([row_of[n] for n in chunk]), vocab.start_id, vocab.end_id,
                      vocab.not_words, max_len)
        captions += out.words(vocab)
    refs = {n: table.references[n] for n in images}
    scores = score_captions(refs, dict(zip(images, captions, strict=True)), meteor=False, tokenizer="simple")
    ref_words = [len(simple_tokenize(r).split()) for n in images for r in refs[n]]
    return {"val_bleu4": scores.values["BLEU-4"], "val_cider": scores.values["CIDEr-D"],
            "val_distinct": 100.0 * len(set(captions)) / len(captions),
            "val_words": sum(len(simple_tokenize(c).split()) for c in captions) / len(captions),
            "ref_words": sum(ref_words) / max(len(ref_words), 1)}


def scst_loss(log_probs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """Mean over generated tokens of -(reward - baseline) * log p; log_probs and mask [N, T], advantage [N]."""
    mask = mask.float()
    return -(advantage.unsqueeze(1) * log_probs * mask).sum() / mask.sum().clamp(min=1.0)


def baselines(kind: str, rewards: torch.Tensor, greedy: torch.Tensor | None, samples: int) -> torch.Tensor:
    """Each sample's baseline: its image's greedy reward, or the mean reward of the image's other samples."""
    if kind == "greedy":
        return greedy.repeat_interleave(samples)
    per_image = rewards.view(-1, samples)
    return ((per_image.sum(1, keepdim=True) - per_image) / (samples - 1)).view(-1)


def run_epoch(decoder, table, feats, row_of, cider, opt, cfg, vocab, max_len, clip_norm, low_precision, epoch,
              rank, world, device, bar, task) -> dict:
    """One pass over this rank's shuffled training images; `low_precision`: bfloat16 matrix products, as the
    run's cross-entropy training used them (its --precision)."""
    decoder.eval()  # dropout off: see the module docstring
    batches = batches_for_rank(len(table.images), cfg.batch_size, cfg.seed * 1000 + epoch, rank, world)
    generator = torch.Generator(device=device).manual_seed((cfg.seed * 1000 + epoch) * 64 + rank)
    bar.reset(task, total=len(batches))
    k, start = cfg.samples, time.perf_counter()
    sums = {"reward": 0.0, "baseline": 0.0, "greedy": 0.0, "words": 0, "captions": 0, "loss": 0.0, "images": 0}
    for idx in batches:
        names = [table.images[i] for i in idx.tolist()]
        features = feats.images([row_of[n] for n in names])
        args = (vocab.start_id, vocab.end_id, vocab.not_words, max_len)
        greedy = None
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low_precision):
            if cfg.baseline == "greedy":
                with torch.no_grad():
                    captions = rollout(decoder, features, *args).words(vocab)
                greedy = torch.tensor(cider.scores(names, captions), dtype=torch.float32)
            drawn = rollout(decoder, features, *args, samples=k, generator=generator)
        words = drawn.words(vocab)
        rewards = torch.tensor(cider.scores([n for n in names for _ in range(k)], words), dtype=torch.float32)
        base = baselines(cfg.baseline, rewards, greedy, k)
        loss = scst_loss(drawn.log_probs, drawn.mask, (rewards - base).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # the sampler calls the decoder's parts, not forward, so DDP hooks would not fire
            for p in decoder.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), clip_norm)
        opt.step()
        sums["reward"] += float(rewards.sum())
        sums["baseline"] += float(base.sum())
        sums["greedy"] += float(greedy.sum()) if greedy is not None else 0.0
        sums["words"] += sum(len(w.split()) for w in words)
        sums["captions"] += len(rewards)
        sums["images"] += len(names)
        sums["loss"] += float(loss.detach()) * len(rewards)
        rate = sums["images"] * world / (time.perf_counter() - start)
        bar.update(task, advance=1, info=f"reward {sums['reward'] / sums['captions']:.3f}  {rate:,.1f} img/s")
    seconds = time.perf_counter() - start
    captions = max(sums["captions"], 1)
    stats = {"train_reward": sums["reward"] / captions, "train_baseline": sums["baseline"] / captions,
             "loss": sums["loss"] / captions, "sample_words": sums["words"] / captions,
             "images_per_s": sums["images"] * world / seconds, "epoch_seconds": seconds}
    if cfg.baseline == "greedy":
        stats["train_greedy_reward"] = sums["greedy"] / max(sums["images"], 1)
    return stats


def scst(cfg: ScstConfig, show_progress: bool = True) -> Path:
    """Fine-tune a cross-entropy run with self-critical training; returns the run folder (see the module doc)."""
    from capcli.data.readers import stored_dataset, stored_images
    from capcli.data.text import Vocabulary, build_vocabulary
    from capcli.devices import resolve_device
    from capcli.features.cache import load_features, trunk_output
    from capcli.features.extraction import extract
    from capcli.model.finetune import tuned_tail
    from capcli.registry import get_backbone
    from capcli.train.cider import CiderD

    cfg.validate()
    cfg = replace(cfg, dataset=cfg.dataset and stored_dataset(cfg.dataset), images=stored_images(cfg.images))
    out = Path(cfg.run)
    source = cross_entropy_checkpoint(out)
    xe = checkpoint.load(source)
    last_path = out / "scst" / "last.pt"
    resume = checkpoint.load(last_path) if last_path.is_file() else None
    xe_copy = None  # best_xe.pt to write with the first epoch: SCST stopped before it leaves the run as it was
    if resume is not None:
        cfg = settings_to_continue(cfg, resume["scst_config"])
    tc = xe["train_config"]
    if cfg.seed is None:
        cfg = replace(cfg, seed=int(tc.get("seed", 0)))
    device = resolve_device(cfg.device)
    rank, world = setup_distributed(device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)

    kind = decoders.kind_of(xe)
    # Photos framed as the run's were; a fine-tuned run reads its trunk rows through its tuned tail, kept fixed.
    backbone = get_backbone(xe["backbone"]).with_resize_mode(xe.get("preprocessing", {}).get("resize_mode", "crop"))
    output = trunk_output(xe["tail"]["split"]) if xe.get("tail") else decoders.feature_output(kind)
    feature_dim = decoders.feature_dim(backbone, kind)
    ds = run_dataset(cfg, xe)
    vocab = Vocabulary.from_json(xe["vocab"])
    checkpoint.check_matches(xe, backbone.name, feature_dim, build_vocabulary(ds, tc["threshold"]).sha256,
                             decoder=kind)
    if rank == 0:  # a no-op when the run's features are still cached
        extract(backbone, ds, xe["weights"], tc.get("feature_batch_size", 32), cfg.workers, device, show_progress,
                output=output, engine=tc.get("engine", "auto"))
    barrier(world)
    cache = load_features(backbone, xe["weights"], ds, output)
    feats = feature_source(cache, output, device)
    if xe.get("tail"):
        feats = TunedGrids(feats, tuned_tail(backbone, xe).to(device))
    row_of = cache.row_index()
    max_len = int(xe["max_len"])
    train_table = encode_split(ds, "train", vocab, cache, max_len)
    val_table = encode_split(ds, "val", vocab, cache, max_len)
    cider = CiderD(train_table.references)  # document frequencies of the training references, once

    decoder = decoders.load(xe).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    clip_norm = float(tc.get("clip_norm", 1.0))
    low_precision = matmul_dtype(tc.get("precision", "fp32"), device) != torch.float32
    if resume is not None:
        decoder.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        start_epoch, history = resume["epoch"] + 1, resume["history"]
        best_cider, stale, start_scores = resume["best_val_cider"], resume["stale"], resume["xe_scores"]
        if rank == 0:
            left = max(cfg.epochs - start_epoch, 0)
            done = "it had stopped early" if stale >= cfg.patience else f"{left} epochs to go"
            err.print(f"continuing SCST in {out} after epoch {start_epoch} ({done}); best val CIDEr-D {best_cider:.1f}")
    else:
        if not (out / "best_xe.pt").is_file():  # written with the first epoch, before best.pt can be replaced
            xe_copy = source.read_bytes()
        elif rank == 0 and (not (out / "best.pt").is_file() or
                            checkpoint.load(out / "best.pt").get("stage") == "scst"):
            # SCST starting over (its folder deleted): best.pt must again be what the new run has to beat
            err.print("note: SCST starts over from best_xe.pt; best.pt is the cross-entropy best again")
            atomic_write_bytes(out / "best.pt", (out / "best_xe.pt").read_bytes())
        start_scores = greedy_scores(decoder, val_table, feats, row_of, vocab, max_len, cfg.val_sample)
        start_epoch, history, best_cider, stale = 0, [], start_scores["val_cider"], 0
        if rank == 0:
            err.print(f"cross-entropy start ({source.name}): val CIDEr-D {start_scores['val_cider']:.1f}  "
                      f"BLEU-4 {start_scores['val_bleu4']:.1f} on {min(cfg.val_sample, len(val_table.images))} "
                      f"images; SCST: {cfg.samples} samples per image, {cfg.baseline} baseline, lr {cfg.lr:g}")

    def payload(epoch: int, scores: dict) -> dict:
        """A checkpoint export and captioning read like any other (the cross-entropy one's fields)."""
        kept = {k: v for k, v in xe.items() if k not in ("optimizer", "scheduler", "rng", "format")}
        return {**kept, "model": decoder.state_dict(), "stage": "scst",
                "scst": {"epoch": epoch + 1, **scores, "config": asdict(replace(cfg, given=None))}}

    if resume is not None:  # last, after everything that draws random numbers while setting up
        restore_rng_states(resume, rank, world)

    with progress(transient=not show_progress) as bar:
        task = bar.add_task("scst", total=1, info="")
        for epoch in range(start_epoch, cfg.epochs):
            if stale >= cfg.patience:
                break  # a continued run that had already stopped early
            bar.update(task, description=f"scst epoch {epoch + 1}/{cfg.epochs}")
            stats = run_epoch(decoder, train_table, feats, row_of, cider, opt, cfg, vocab, max_len, clip_norm,
                              low_precision, epoch, rank, world, device, bar, task)
            if not math.isfinite(mean_over_ranks(stats["loss"], world, device)):
                bar.live.transient = True
                raise CapcliError(f"SCST stopped in epoch {epoch + 1}: the loss is not finite; lower --lr "
                                  f"(now {cfg.lr:g}) and delete {out / 'scst'} to start SCST over")
            # every rank scores the same images with the same weights, so all take the same decisions
            scores = greedy_scores(decoder, val_table, feats, row_of, vocab, max_len, cfg.val_sample)
            stats.update(epoch=epoch + 1, **scores)
            rng = gather_rng_states(world)  # as the next epoch will find them
            checksums = all_equal_checksums(decoder, world)
            if len(set(checksums)) != 1:
                raise CapcliError(f"distributed ranks disagree on weights at SCST epoch {epoch + 1}")
            improved = scores["val_cider"] > best_cider + 1e-6
            best_cider, stale = (scores["val_cider"], 0) if improved else (best_cider, stale + 1)
            stats["best"] = improved
            history.append(stats)
            if rank == 0:
                if xe_copy is not None:
                    atomic_write_bytes(out / "best_xe.pt", xe_copy)
                    xe_copy = None
                if improved:
                    checkpoint.save(out / "best.pt", payload(epoch, scores))
                (out / "scst").mkdir(exist_ok=True)
                checkpoint.save(last_path, {
                    **payload(epoch, scores), "optimizer": opt.state_dict(), "epoch": epoch,
                    "history": history, "best_val_cider": best_cider, "stale": stale, "xe_scores": start_scores,
                    "scst_config": asdict(replace(cfg, given=None)), "rng": rng})
                write_metrics(out / "scst", history)
                print_epoch(stats)
            if stale >= cfg.patience:
                if rank == 0:
                    err.print(f"early stop: no val CIDEr-D improvement for {cfg.patience} epochs")
                break
    barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def print_epoch(s: dict) -> None:
    err.print(
        f"scst epoch {s['epoch']:>3}  reward {s['train_reward']:.3f}  baseline {s['train_baseline']:.3f}  "
        f"val BLEU-4 {s['val_bleu4']:.1f}  CIDEr-D {s['val_cider']:.1f}  distinct {s['val_distinct']:.0f}%  "
        f"words {s['val_words']:.1f} (refs {s['ref_words']:.1f})  {s['images_per_s']:,.1f} img/s"
        f"{'  *best' if s['best'] else ''}"
    )
