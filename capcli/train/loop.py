"""Training the caption decoder on cached features: one plain loop, read top to bottom.

Whole captions go through the LSTM in one forward with teacher forcing; the loss ignores padding.
`decoder` picks the pooled decoder (one feature vector per image) or the attention decoder (the
backbone's feature grid, read batch by batch from its cache file); the loop is the same for both.
With `finetune` the cache holds a split point's trunk output and the backbone's tail trains with the
attention decoder (`capcli.model.finetune`); with `flip` each epoch shows about half the training images
mirrored (their features cached once beside the originals), "left" and "right" swapped in their captions.
Run under `torchrun -m capcli train ...` it becomes DistributedDataParallel (NCCL on GPU, gloo on
CPU): every rank takes its share of each epoch's shuffled captions and only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from capcli.console import err, progress
from capcli.devices import matmul_dtype
from capcli.errors import CapcliError
from capcli.model import checkpoint, decoders
from capcli.model.attention import AttentionConfig, doubly_stochastic
from capcli.model.finetune import FineTuned, build_tail, load_tail, tail_entry
from capcli.model.pooled import DecoderConfig
from capcli.paths import atomic_write_json
from capcli.train.batches import batches_for_rank, feature_source, swap_words
from capcli.train.captions import encode_split
from capcli.train.config import TrainConfig
from capcli.train.distributed import (
    all_equal_checksums,
    barrier,
    gather_rng_states,
    mean_over_ranks,
    restore_rng_states,
    setup_distributed,
)
from capcli.train.run_folder import (
    check_run_dir,
    checkpoint_to_resume,
    make_run_dir,
    plot_curves,
    run_dir,
    write_metrics,
)

# benchmarks/bench_decoders.py: the attention decoder is right more often on every checkable figure of the
# synthetic set; a backbone that declares no grid gets the pooled decoder.
DEFAULT_DECODER = "attention"
FLIP_SEED = 777_777  # offsets the per-epoch seed of which images are mirrored from the shuffle's
SWAPPED_WORDS = (("left", "right"),)  # what a mirrored photo's captions exchange


def caption_loss(
    model, inputs: torch.Tensor | dict, tokens: torch.Tensor, pad_id: int, reg: float = 0.0, smoothing: float = 0.0
) -> tuple[torch.Tensor, int, float]:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]; padding ignored.

    `inputs`: pooled features [N, D], or the decoder's keyword inputs (see `capcli.train.batches`). An
    attention decoder adds reg x its doubly stochastic regulariser over the real steps. Returns the
    loss to minimise, the number of predicted tokens and the regulariser's share of the loss.
    """
    inputs = {"features": inputs} if isinstance(inputs, torch.Tensor) else inputs
    out = model(**inputs, tokens=tokens[:, :-1])
    logits, alphas = out if isinstance(out, tuple) else (out, None)
    targets = tokens[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id,
                           label_smoothing=smoothing)
    penalty = 0.0
    if alphas is not None and reg:
        term = reg * doubly_stochastic(alphas, (targets != pad_id).float())
        loss, penalty = loss + term, float(term.detach())
    return loss, int((targets != pad_id).sum()), penalty


def trim(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop all-padding columns so a batch costs only its longest caption."""
    width = int((tokens != pad_id).sum(1).max())
    return tokens[:, :width]


def epoch_flips(cfg: TrainConfig, images: int, epoch: int) -> torch.Tensor | None:
    """Which images this epoch shows mirrored (each with probability 1/2, drawn per epoch), or None without flip."""
    if not cfg.flip:
        return None
    return torch.rand(images, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch + FLIP_SEED)) < 0.5


def swapped_pairs(vocab) -> list[tuple[int, int]]:
    return [(vocab.stoi[a], vocab.stoi[b]) for a, b in SWAPPED_WORDS if a in vocab.stoi and b in vocab.stoi]


def run_epoch(model, table, feats, opt, cfg, epoch, rank, world, device, bar, task, flips=None, swaps=()) -> dict:
    """One pass over this rank's shuffled captions (`feats`: a `capcli.train.batches` source); a single process
    stops at a non-finite loss. `flips`: which images are shown mirrored, with the word pairs `swaps` exchanged."""
    model.train()
    low_precision = matmul_dtype(cfg.precision, device) != torch.float32
    model_cfg = model.module.cfg if hasattr(model, "module") else model.cfg
    pad, reg = model_cfg.pad_id, getattr(model_cfg, "attention_reg", 0.0)
    groups = table.rows if isinstance(model_cfg, AttentionConfig) else None
    batches = batches_for_rank(len(table.rows), cfg.batch_size, cfg.seed * 1000 + epoch, rank, world, groups)
    bar.reset(task, total=len(batches))
    total_loss, total_penalty, total_tokens, start = 0.0, 0.0, 0, time.perf_counter()
    for idx, inputs in feats.batches(table.rows, batches, flips):
        tokens = table.tokens[idx]
        if "flipped" in inputs:
            tokens = swap_words(tokens, inputs.pop("flipped"), swaps)
        tokens = trim(tokens, pad).to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low_precision):
            loss, n_tokens, penalty = caption_loss(model, inputs, tokens, pad, reg, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        value = loss.item()
        total_loss += (value - penalty) * n_tokens
        total_penalty += penalty * n_tokens
        total_tokens += n_tokens
        rate = total_tokens * world / (time.perf_counter() - start)
        bar.update(task, advance=1, info=f"loss {value:.3f}  {rate:,.0f} tok/s")
        if not math.isfinite(value) and world == 1:
            break  # the epoch's loss is now not finite and the run stops; DDP ranks decide together
    seconds = time.perf_counter() - start
    stats = {"train_loss": total_loss / max(total_tokens, 1), "tokens_per_s": total_tokens * world / seconds,
             "epoch_seconds": seconds}
    if groups is not None:  # the cross-entropy above is comparable with the pooled decoder's; this is extra
        stats["attention_penalty"] = total_penalty / max(total_tokens, 1)
    return stats


@torch.no_grad()
def validation_loss(decoder, table, feats, device, batch_size: int = 256) -> float:
    """Mean cross-entropy over the validation captions (no regulariser: comparable across decoders)."""
    decoder.eval()
    total, count = 0.0, 0
    for idx, inputs in feats.batches(table.rows, list(torch.arange(len(table.rows)).split(batch_size))):
        tokens = trim(table.tokens[idx], decoder.cfg.pad_id).to(device)
        loss, n, _ = caption_loss(decoder, inputs, tokens, decoder.cfg.pad_id)
        total += loss.item() * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def generated_scores(decoder, table, feats, cache, vocab, sample: int, device, tail=None) -> dict:
    """BLEU-4 and CIDEr-D of greedy captions on a bounded, fixed sample of validation images (`tail`: the tuned
    tail that turns cached trunk rows into grids)."""
    from capcli.decode import greedy
    from capcli.metrics import score_captions
    from capcli.model.steps import torch_step

    images = table.images[:sample]
    row_of = cache.row_index()
    candidates = {}
    for start in range(0, len(images), 250):  # bounded memory: a grid batch of 250 images is ~60 MB
        chunk = images[start : start + 250]
        rows = feats.images([row_of[i] for i in chunk])
        state, context = decoders.start(decoder, tail(rows) if tail is not None else rows)
        hyps = greedy(torch_step(decoder, device), state, vocab.start_id, vocab.end_id, context=context,
                      never=vocab.not_words)
        candidates.update({img: vocab.decode(h.tokens) for img, h in zip(chunk, hyps, strict=True)})
    scores = score_captions({i: table.references[i] for i in images}, candidates, meteor=False, tokenizer="simple")
    return {"val_bleu4": scores.values["BLEU-4"], "val_cider": scores.values["CIDEr-D"]}


def check_finite(loss: float, what: str, epoch: int, cfg: TrainConfig, out: Path, bar) -> None:
    """Stop a run whose loss is NaN or infinite: its weights are no longer numbers."""
    if math.isfinite(loss):
        return
    bar.live.transient = True  # the error is the one line left
    kept = (f"{out / 'best.pt'} keeps the best epoch before it" if (out / "best.pt").is_file()
            else "no checkpoint was written")
    raise CapcliError(
        f"training stopped in epoch {epoch + 1}: the {what} loss is {loss} (not finite); the learning rate "
        f"{cfg.lr:g} is probably too high: lower --lr and start again with another --out; {kept}"
    )


def lr_factor(cfg: TrainConfig):
    return lambda epoch: 1.0 if epoch < cfg.lr_keep_epochs else cfg.lr_decay ** (epoch - cfg.lr_keep_epochs + 1)


def train(cfg: TrainConfig, show_progress: bool = True) -> Path:
    """Train a decoder; returns the run directory (best.pt, last.pt, vocab.json, metrics, curves)."""
    from capcli.data.readers import load_dataset, stored_dataset, stored_images
    from capcli.data.text import build_vocabulary, check_coverage
    from capcli.devices import resolve_device
    from capcli.features.cache import load_features, trunk_output
    from capcli.features.extraction import extract
    from capcli.registry import get_backbone
    from capcli.train.config import settings_for_resume

    cfg = replace(cfg, dataset=stored_dataset(cfg.dataset), images=stored_images(cfg.images))  # from any folder
    resume_ckpt = checkpoint_to_resume(cfg) if cfg.resume else None
    if resume_ckpt is not None:
        cfg = settings_for_resume(cfg, resume_ckpt.get("train_config", {}))
        if "select_on" not in resume_ckpt.get("train_config", {}):  # written before selection on CIDEr-D
            cfg = replace(cfg, select_on="loss")
        if "resize_mode" not in resume_ckpt.get("train_config", {}):  # written before resize modes: crop
            cfg = replace(cfg, resize_mode="crop")
    cfg.validate()
    device = resolve_device(cfg.device)
    rank, world = setup_distributed(device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    backbone = get_backbone(cfg.backbone)
    if cfg.decoder is None:  # a run from before decoder kinds keeps its own (pooled); a new one the default
        cfg = replace(cfg, decoder=decoders.kind_of(resume_ckpt) if resume_ckpt is not None else
                      "pooled" if cfg.feature_input else default_decoder(backbone, rank))
    output = decoders.feature_output(cfg.decoder)
    feature_dim = decoders.feature_dim(backbone, cfg.decoder)  # names the plugin when it has no grid
    if cfg.feature_input and cfg.decoder != "pooled":
        raise CapcliError("--feature-input is an option of the pooled decoder; the attention decoder reads the grid")
    if cfg.finetune:
        if cfg.decoder != "attention":
            raise CapcliError("--finetune trains the backbone's tail with the attention decoder; drop --decoder pooled")
        cfg = replace(cfg, split=backbone.split(cfg.split).name)  # the default split gets its name
        output = trunk_output(cfg.split)
    if resume_ckpt is not None:  # before extracting: a decoder mix-up must not cost a feature pass
        checkpoint.check_matches(resume_ckpt, backbone.name, feature_dim, decoder=cfg.decoder)
    ds = load_dataset(cfg.dataset, images=cfg.images, seed=cfg.seed)
    for note in ds.notes if rank == 0 else []:
        err.print(f"note: {note}", markup=False)
    cfg, backbone = resolve_resize_mode(cfg, backbone, ds)
    check_coverage(ds, cfg.threshold)
    vocab = build_vocabulary(ds, cfg.threshold)
    if resume_ckpt is not None:
        checkpoint.check_matches(resume_ckpt, backbone.name, feature_dim, vocab.sha256, decoder=cfg.decoder)
    out = check_run_dir(cfg) if rank == 0 else run_dir(cfg)

    if rank == 0:  # features are extracted once, by one process
        for flip in (False, True) if cfg.flip else (False,):
            extract(backbone, ds, cfg.weights, cfg.feature_batch_size, cfg.workers, device, show_progress,
                    output=output, engine=cfg.engine, flip=flip)
    barrier(world)
    cache = load_features(backbone, cfg.weights, ds, output)
    if cache.failed and rank == 0:
        err.print(f"{len(cache.failed)} images could not be read and are left out (see {cache.path}/meta.json)")
    flipped = load_features(backbone, cfg.weights, ds, output, flip=True) if cfg.flip else None
    feats = feature_source(cache, output, device, flipped)

    train_table = encode_split(ds, "train", vocab, cache, cfg.max_len)
    val_table = encode_split(ds, "val", vocab, cache, cfg.max_len)

    model_cfg = decoder_config(cfg, feature_dim, len(vocab), vocab.pad_id)
    tail = build_tail(backbone, cfg.weights, cfg.split).to(device) if cfg.finetune else None
    # Seeded here, after feature extraction and the tail: building a backbone draws from the global RNG, and
    # whether the cache was cold must not change the decoder's initial weights or the run's dropout masks.
    torch.manual_seed(cfg.seed)
    decoder = decoders.build(cfg.decoder, model_cfg).to(device)
    trained = FineTuned(tail, decoder) if tail is not None else decoder
    groups = [{"params": decoder.parameters(), "lr": cfg.lr}]
    groups += [{"params": tail.parameters(), "lr": cfg.backbone_lr}] if tail is not None else []
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    history: list[dict] = []
    start_epoch, best_score, stale = 0, -math.inf, 0
    if resume_ckpt is not None:
        decoder.load_state_dict(resume_ckpt["model"])
        if tail is not None:
            load_tail(tail.tail, resume_ckpt["tail"], backbone.name)
        opt.load_state_dict(resume_ckpt["optimizer"])
        sched.load_state_dict(resume_ckpt["scheduler"])
        start_epoch, stale = resume_ckpt["epoch"] + 1, resume_ckpt["stale"]
        best_score = resume_ckpt.get("best_score", -resume_ckpt["best_val_loss"])
        history = resume_ckpt["history"]
    model = trained
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device] if "cuda" in device else None)

    if rank == 0:
        make_run_dir(out)
        vocab.save(out / "vocab.json")
        atomic_write_json(out / "config.json", {"train": asdict(cfg), "model": model_cfg.to_dict(),
                                                  "world_size": world, "features": str(cache.path)})

    def payload(epoch: int, rng: list[dict]) -> dict:
        return {
            "config": model_cfg.to_dict(), "model": decoder.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": epoch, "best_score": best_score, "stale": stale,
            "best_val_loss": min((h["val_loss"] for h in history if h.get("best")), default=math.inf),
            "history": history, "vocab": vocab.to_json(), "vocab_sha256": vocab.sha256,
            "backbone": backbone.name, "weights": cfg.weights, "feature_dim": feature_dim, "decoder": cfg.decoder,
            "grid": backbone.require_grid().to_dict() if cfg.decoder == "attention" else None,
            "preprocessing": backbone.preprocessing.to_dict(), "max_len": cfg.max_len,
            **({"tail": tail_entry(tail, cfg.split)} if tail is not None else {}),
            "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(), "train_config": asdict(cfg),
            "rng": rng,
        }

    if resume_ckpt is not None:  # last, after everything that draws random numbers while setting up
        restore_rng_states(resume_ckpt, rank, world)

    with progress(transient=not show_progress) as bar:
        task = bar.add_task("train", total=1, info="")
        for epoch in range(start_epoch, cfg.epochs):
            bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs}")
            stats = run_epoch(model, train_table, feats, opt, cfg, epoch, rank, world, device, bar, task,
                              epoch_flips(cfg, len(cache.images), epoch), swapped_pairs(vocab))
            check_finite(mean_over_ranks(stats["train_loss"], world, device), "training", epoch, cfg, out, bar)
            stats.update(epoch=epoch + 1, lr=opt.param_groups[0]["lr"])
            sched.step()
            stats["val_loss"] = mean_over_ranks(validation_loss(trained, val_table, feats, device), world, device)
            check_finite(stats["val_loss"], "validation", epoch, cfg, out, bar)
            rng = gather_rng_states(world)  # as the next epoch will find them
            stats["param_checksums"] = all_equal_checksums(trained, world)
            if len(set(stats["param_checksums"])) != 1:
                raise CapcliError(f"distributed ranks disagree on weights at epoch {epoch + 1}")
            # Every rank scores the same greedy captions with the same weights, so they agree on "improved".
            stats.update(generated_scores(decoder, val_table, feats, cache, vocab, cfg.val_sample, device, tail))
            score = selection_score(stats, cfg.select_on)
            improved = score > best_score + 1e-4
            best_score, stale = (score, 0) if improved else (best_score, stale + 1)
            if rank == 0:
                stats["best"] = improved
                history.append(stats)
                if improved:
                    checkpoint.save(out / "best.pt", payload(epoch, rng))
                checkpoint.save(out / "last.pt", payload(epoch, rng))
                write_metrics(out, history)
                print_epoch(stats)
            if stale >= cfg.patience:
                if rank == 0:
                    err.print(f"early stop: no validation improvement for {cfg.patience} epochs")
                break
    barrier(world)
    if rank == 0:
        plot_curves(out, history)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def resolve_resize_mode(cfg: TrainConfig, backbone, ds):
    """(cfg, backbone) with the run's resize mode settled (`capcli.images.resize_mode_for`); the backbone then
    frames photos that way, in its features and checkpoints (config.json and the training table name it)."""
    from capcli.images import resize_mode_for

    mode, _ = resize_mode_for(cfg.resize_mode, ds)
    return replace(cfg, resize_mode=mode), backbone.with_resize_mode(mode)


def selection_score(stats: dict, select_on: str) -> float:
    """Higher is better: val CIDEr-D of greedy captions (what captions are judged by), or minus the val loss."""
    return stats["val_cider"] if select_on == "cider" else -stats["val_loss"]


def default_decoder(backbone, rank: int = 0) -> str:
    """DEFAULT_DECODER where the backbone can feed it; the pooled decoder (said once) where it has no grid."""
    if DEFAULT_DECODER == "attention" and not backbone.has_grid:
        if rank == 0:
            err.print(f"note: backbone '{backbone.name}' declares no feature grid: training the pooled decoder")
        return "pooled"
    return DEFAULT_DECODER


def decoder_config(cfg: TrainConfig, feature_dim: int, vocab_size: int, pad_id: int):
    """The decoder's config for this run: the options both kinds share, and the kind's own."""
    common = {"feature_dim": feature_dim, "vocab_size": vocab_size, "embed_dim": cfg.embed_dim,
              "hidden_dim": cfg.hidden_dim, "num_layers": cfg.num_layers, "dropout": cfg.dropout, "pad_id": pad_id}
    if decoders.check_kind(cfg.decoder) == "attention":
        return AttentionConfig(**common, context_dim=cfg.context_dim, attention_dim=cfg.attention_dim,
                               attention_reg=cfg.attention_reg)
    return DecoderConfig(**common, feature_input=cfg.feature_input)


def print_epoch(s: dict) -> None:
    err.print(
        f"epoch {s['epoch']:>3}  train {s['train_loss']:.3f}  val {s['val_loss']:.3f}  "
        f"BLEU-4 {s['val_bleu4']:.1f}  CIDEr {s['val_cider']:.1f}  {s['tokens_per_s']:,.0f} tok/s  "
        f"lr {s['lr']:.2e}{'  *best' if s['best'] else ''}"
    )


