"""Real photographs: the whole pipeline on Flickr8k, capcli's recipe beside the defaults before it, scored on val.

Each row trains on the official train split (features extracted once per backbone, then cached), exports a
bundle, and captions the 1,000 val photos with ONNX Runtime, beam 3 (the classifier's guidance off unless
--guidance), scored with pycocoevalcap (PTB tokenizer; METEOR needs java). Rows:
- recipe: `capcli train`'s defaults (the attention decoder over efficientnet_lite0's 7x7 grid);
- before: the defaults this recipe replaced (fp32, batch 64, best epoch and early stopping on val loss);
- pooled: the recipe with the pooled decoder (one vector per image);
- noreg: the recipe without the doubly stochastic attention regulariser (--attention-reg 0);
- flip: the recipe with flip augmentation (--flip: about half the training photos mirrored each epoch);
- finetune: the recipe with the backbone's last stage and conv_head trained too (--finetune, split blocks.6);
- finetune-b5: the same from split blocks.5 (the last two stages);
- finetune-flip: --finetune and --flip together (finetune-b5-flip: from blocks.5);
- finetune-lr5e-4: --finetune with the tail's learning rate 5x the default (--backbone-lr 5e-4);
- scst: the recipe's run fine-tuned with self-critical training (`capcli scst`), in a copy of its folder;
- scst-mean: the same with the mean reward of the image's other samples as the baseline (not its greedy caption);
- scst-mean-long: scst-mean at twice the learning rate (1e-4) for 8 epochs;
- scst-mean-k10: the same with 10 captions sampled per image, for 5 epochs.
SCST rows start from the run of --scst-base (default: recipe), in a folder named ROW or ROW@BASE.
Runs live in --work and are resumed when the benchmark is run again; a finished row is only scored.

    python benchmarks/bench_flickr8k.py                          # every row, ../shared/data/flickr8k
    python benchmarks/bench_flickr8k.py --rows recipe,before --dataset PATH
    python benchmarks/bench_flickr8k.py --speed                  # training tokens/s only, same run

--speed times training steps of the recipe and of the defaults before it on real Flickr8k captions and
grids (alternated, median of rounds) beside the machine's fp32 and bf16 matmul peaks measured in the same run.
--speed-finetune times the recipe's steps frozen (grid rows) against fine-tuning from split blocks.6 and blocks.5
(trunk rows through the trainable tail), alternated in one run: what an epoch costs against a frozen one.

    python benchmarks/bench_flickr8k.py --speed-finetune
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT.parent / "shared" / "data" / "flickr8k"

# The defaults before the recipe, as `capcli train` had them.
BEFORE = {"batch_size": 64, "lr": 1e-3, "lr_keep_epochs": 3, "lr_decay": 0.9, "patience": 3, "dropout": 0.3,
          "select_on": "loss", "val_sample": 200, "precision": "fp32", "label_smoothing": 0.0}
ROWS = {"recipe": {}, "before": BEFORE, "pooled": {"decoder": "pooled"}, "noreg": {"attention_reg": 0.0},
        "flip": {"flip": True}, "finetune": {"finetune": True}, "finetune-b5": {"finetune": True, "split": "blocks.5"},
        "finetune-flip": {"finetune": True, "flip": True},
        "finetune-b5-flip": {"finetune": True, "split": "blocks.5", "flip": True},
        "finetune-lr5e-4": {"finetune": True, "backbone_lr": 5e-4}}
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def train_row(name: str, overrides: dict, args) -> tuple[Path, float]:
    """The row's run folder (trained, or resumed until done) and its training wall time in seconds."""
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    out = Path(args.work) / name
    timing = out / "bench-train.json"
    if timing.is_file():
        return out, json.loads(timing.read_text())["train_wall_s"]
    resume = (out / "last.pt").is_file()
    spent = json.loads((out / "bench-partial.json").read_text())["s"] if (out / "bench-partial.json").is_file() else 0
    start = time.perf_counter()
    try:
        train(TrainConfig(backbone=args.backbone, dataset=str(args.dataset), out=str(out), epochs=args.epochs,
                          seed=args.seed, resume=resume, **({} if resume else overrides)), show_progress=False)
    except BaseException:
        if out.is_dir():  # an interrupted row goes on where it stopped, its time so far kept
            (out / "bench-partial.json").write_text(json.dumps({"s": spent + time.perf_counter() - start}))
        raise
    wall = spent + time.perf_counter() - start
    timing.write_text(json.dumps({"train_wall_s": wall}))
    return out, wall


# SCST rows: the baseline each subtracts from a sample's reward, and what else differs from `capcli scst`'s defaults.
SCST_ROWS = {"scst": {"baseline": "greedy"}, "scst-mean": {"baseline": "mean"},
             "scst-mean-long": {"baseline": "mean", "lr": 1e-4, "epochs": 8},
             "scst-mean-k10": {"baseline": "mean", "lr": 1e-4, "epochs": 5, "samples": 10}}


def scst_row(name: str, recipe_run: Path, args) -> tuple[Path, float]:
    from capcli.train.scst import ScstConfig, scst

    out = Path(args.work) / (name if args.scst_base == "recipe" else f"{name}@{args.scst_base}")
    timing = out / "bench-train.json"
    epochs = SCST_ROWS[name].get("epochs", args.scst_epochs)
    done = json.loads(timing.read_text()) if timing.is_file() else {"train_wall_s": 0.0}
    if done.get("scst_epochs", 4) >= epochs and timing.is_file():
        return out, done["train_wall_s"]
    if not (out / "scst").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(recipe_run, out, ignore=shutil.ignore_patterns("bench-*.json", "bundle"))
    # A larger --scst-epochs continues the row (capcli scst resumes): its bundle and scores are made again.
    shutil.rmtree(out / "bundle", ignore_errors=True)
    for old in out.glob("bench-val-*.json"):
        old.unlink()
    start = time.perf_counter()
    scst(ScstConfig(run=str(out), **{"seed": args.seed, **SCST_ROWS[name], "epochs": epochs}), show_progress=False)
    wall = done["train_wall_s"] + time.perf_counter() - start
    timing.write_text(json.dumps({"train_wall_s": wall, "scst_epochs": epochs}))
    return out, wall


def score_row(run: Path, args) -> dict:
    """Export (once) and score the val split, beam 3, with ONNX Runtime."""
    from capcli.bundle.build import export
    from capcli.evaluate import evaluate
    from capcli.runtime.captioner import DEFAULT_GUIDANCE, NO_GUIDANCE

    bundle = run / "bundle"
    if not (bundle / "capcli.json").is_file():
        export(run, bundle, force=True)
    guidance = DEFAULT_GUIDANCE if args.guidance else NO_GUIDANCE
    report = evaluate(bundle, str(args.dataset), split="val", beam_size=args.beam, provider="cpu",
                      out=run / f"bench-val-beam{args.beam}{'-guided' if args.guidance else ''}.json", force=True,
                      show_progress=False, guidance=guidance)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    captions = [c["caption"] for c in report["captions"]]
    return {
        "scores": report["scores"], "tokenizer": report["tokenizer"],
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in history),
        "epochs": len(history), "best_epoch": max((h["epoch"] for h in history if h.get("best")), default=0),
        "bundle_mb": sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 2**20,
        "distinct_captions_pct": 100.0 * len(set(captions)) / max(len(captions), 1),
        "mean_words": statistics.mean(len(c.split()) for c in captions),
        "bundle": str(bundle),
        **attention_sharpness(bundle, args),
    }


def attention_sharpness(bundle: Path, args, images: int = 200) -> dict:
    """How peaked the attention maps are on val photos: the mean entropy of each generated word's weights over
    the grid, as a share of the uniform distribution's (100 % = flat), and the mean largest weight (1/P = flat).
    """
    import numpy as np

    from capcli.data.readers import load_dataset
    from capcli.runtime.captioner import caption_images, open_captioner

    captioner = open_captioner(bundle, "onnx", provider="cpu")
    if captioner.grid is None:
        return {}
    ds = load_dataset(str(args.dataset))
    paths = [ds.image_path(n) for n in ds.splits["val"][:images]]
    alphas = np.concatenate([np.stack([a for _, a in r.attention])
                             for r in caption_images(captioner, paths, beam_size=args.beam, attention=True)])
    entropy = -(alphas * np.log(np.clip(alphas, 1e-12, None))).sum(axis=1)
    return {"attention_entropy_pct": float(100 * entropy.mean() / np.log(alphas.shape[1])),
            "attention_max": float(alphas.max(axis=1).mean()), "grid_positions": int(alphas.shape[1])}


def ship(name: str, run: Path, result: dict, args) -> Path:
    """The row's model as the bundle capcli ships: float16-stored weights (half the bytes, float32 compute; the
    float32 bundle is over the repository's 25 MB), its val scores and recipe in capcli.json, and a model card."""
    from capcli.bundle.build import export
    from capcli.bundle.manifest import sealed
    from capcli.model import checkpoint

    out = ROOT / "exported" / "flickr8k"
    bundle = export(run, out, quantize="float16", force=True)
    ckpt = checkpoint.load(run / "best.pt")
    manifest = json.loads((bundle / "capcli.json").read_text())
    # Paths as this checkout names them, not this machine's absolute ones.
    manifest["source_checkpoint"] = _relative(manifest["source_checkpoint"])
    train_config = dict(ckpt.get("train_config") or {})
    if train_config.get("out"):
        train_config["out"] = Path(train_config["out"]).name  # the run folder's name, not where it lay
    manifest["model_card"] = {
        "trained_on": "Flickr8k (Hodosh et al. 2013), official train split, 6,000 photos x 5 captions, 224x224 copies",
        "recipe": f"benchmarks/bench_flickr8k.py row '{name}'", "train_config": train_config,
        "stage": ckpt.get("stage", "cross-entropy"),
        "val": {"split": "Flickr8k val (1,000 photos)", "beam_size": args.beam, "runtime": "onnx",
                "tokenizer": result["tokenizer"], "scores": result["scores"]},
        "intended_use": "research and demonstration; English captions of everyday photos",
    }
    tmp = bundle / ".capcli.json.tmp"
    tmp.write_text(json.dumps(sealed(manifest), indent=2) + "\n")  # as export wrote it: no 'edited' warning
    tmp.replace(bundle / "capcli.json")
    return bundle


def _relative(path: str) -> str:
    """`path` relative to the checkout when it lies inside it (the same path otherwise)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def print_rows(results: dict) -> None:
    head = ["row", *METRICS, "train min", "tok/s", "epochs (best)", "MB", "distinct %", "words", "attn entropy %"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in results.items():
        s = r["scores"]
        cells = [name, *(f"{s[m]:.1f}" if m in s else "-" for m in METRICS), f"{r['train_wall_s'] / 60:.1f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['epochs']} ({r['best_epoch']})", f"{r['bundle_mb']:.1f}",
                 f"{r['distinct_captions_pct']:.0f}", f"{r['mean_words']:.1f}",
                 f"{r['attention_entropy_pct']:.0f}" if "attention_entropy_pct" in r else "-"]
        print("| " + " | ".join(cells) + " |")


def speed(args) -> None:
    """Training tokens/s of the recipe and of the defaults before it on real captions, alternated, same run."""
    import torch

    from capcli.data.readers import load_dataset
    from capcli.data.text import build_vocabulary
    from capcli.devices import matmul_dtype
    from capcli.features.cache import load_features
    from capcli.features.extraction import extract
    from capcli.model import decoders
    from capcli.registry import get_backbone
    from capcli.train.batches import batches_for_rank, feature_source
    from capcli.train.captions import encode_split
    from capcli.train.config import TrainConfig
    from capcli.train.loop import decoder_config

    backbone = get_backbone(args.backbone)
    ds = load_dataset(str(args.dataset))
    extract(backbone, ds, "imagenet", 32, None, "cpu", False, output="grid")
    cache = load_features(backbone, "imagenet", ds, "grid")
    vocab = build_vocabulary(ds, 5)
    table = encode_split(ds, "train", vocab, cache, 20)
    feats = feature_source(cache, "grid", "cpu")
    setups = {}
    for name, overrides in (("before", BEFORE), ("recipe", {})):
        known = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(backbone=args.backbone, **{k: v for k, v in overrides.items() if k in known})
        torch.manual_seed(0)
        model = decoders.build("attention", decoder_config(
            TrainConfig(**{**cfg.__dict__, "decoder": "attention"}), backbone.require_grid().channels, len(vocab),
            vocab.pad_id))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        batches = batches_for_rank(len(table.rows), cfg.batch_size, 0, 0, 1, table.rows)
        setups[name] = (cfg, model, opt, batches, matmul_dtype(cfg.precision, "cpu"))
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(args.rounds):
        for name, (cfg, model, opt, batches, dtype) in setups.items():
            chosen = batches[round_ * args.steps : (round_ + 1) * args.steps]
            rates[name].append(timed_steps(model, opt, feats, table, chosen, cfg, dtype, vocab.pad_id))
    fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    flop = training_flop_per_token(setups["recipe"][1].cfg, backbone.require_grid().positions)
    print(f"Flickr8k train captions, vocabulary {len(vocab)}, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} rounds of {args.steps} steps, median tokens/s")
    print(f"matmul peak (2048^3, same run): fp32 {fp32:,.0f} GFLOP/s, bf16 {bf16:,.0f} GFLOP/s; "
          f"training ~{flop / 1e6:.1f} MFLOP per token (forward + backward)")
    base = statistics.median(rates["before"])
    for name, (cfg, *_rest, dtype) in setups.items():
        rate = statistics.median(rates[name])
        print(f"{name:>7}: batch {cfg.batch_size:>3}, {str(dtype).removeprefix('torch.'):>8}: {rate:8,.0f} tok/s "
              f"({rate / base:.2f}x before) = {100 * rate * flop / 1e9 / fp32:.0f} % of the fp32 matmul peak")


def timed_steps(model, opt, feats, table, chosen, cfg, dtype, pad_id: int) -> float:
    """Training tokens/s over the `chosen` batches: the loop's steps (loss, backward, clipping, Adam)."""
    import torch

    from capcli.train.loop import caption_loss, trim

    tokens, start = 0, time.perf_counter()
    for idx, inputs in feats.batches(table.rows, chosen):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            loss, n, _ = caption_loss(model, inputs, trim(table.tokens[idx], pad_id), pad_id, cfg.attention_reg,
                                      cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        tokens += n
    return tokens / (time.perf_counter() - start)


def speed_finetune(args) -> None:
    """Training tokens/s frozen against fine-tuning the tail from each split point, alternated, same run."""
    import torch

    from capcli.data.readers import load_dataset
    from capcli.data.text import build_vocabulary
    from capcli.devices import matmul_dtype
    from capcli.features.cache import load_features, trunk_output
    from capcli.features.extraction import extract
    from capcli.model import decoders
    from capcli.model.finetune import FineTuned, build_tail
    from capcli.registry import get_backbone
    from capcli.train.batches import batches_for_rank, feature_source
    from capcli.train.captions import encode_split
    from capcli.train.config import TrainConfig
    from capcli.train.loop import decoder_config

    backbone = get_backbone(args.backbone).with_resize_mode("squash")  # Flickr8k's copies are square
    ds = load_dataset(str(args.dataset))
    vocab = build_vocabulary(ds, 5)
    cfg = TrainConfig(backbone=args.backbone, decoder="attention")
    dtype = matmul_dtype(cfg.precision, "cpu")
    setups, extraction_s = {}, {}
    for name, split in (("frozen", None), ("finetune blocks.6", "blocks.6"), ("finetune blocks.5", "blocks.5")):
        output = trunk_output(split) if split else "grid"
        start = time.perf_counter()  # a cache already there costs ~0 s: CAPCLI_CACHE=<empty folder> times it cold
        extract(backbone, ds, "imagenet", 32, None, "cpu", False, output=output)
        extraction_s[name] = time.perf_counter() - start
        cache = load_features(backbone, "imagenet", ds, output)
        table = encode_split(ds, "train", vocab, cache, 20)
        torch.manual_seed(0)
        decoder = decoders.build("attention", decoder_config(cfg, backbone.require_grid().channels, len(vocab),
                                                             vocab.pad_id))
        model, groups = decoder, [{"params": decoder.parameters(), "lr": cfg.lr}]
        if split:
            tail = build_tail(backbone, "imagenet", split)
            model = FineTuned(tail, decoder)
            groups.append({"params": tail.parameters(), "lr": cfg.backbone_lr})
        opt = torch.optim.Adam(groups, lr=cfg.lr)
        batches = batches_for_rank(len(table.rows), cfg.batch_size, 0, 0, 1, table.rows)
        setups[name] = (model, opt, batches, feature_source(cache, output, "cpu"), table)
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(args.rounds):
        for name, (model, opt, batches, feats, table) in setups.items():
            model.train()
            chosen = batches[round_ * args.steps : (round_ + 1) * args.steps]
            rates[name].append(timed_steps(model, opt, feats, table, chosen, cfg, dtype, vocab.pad_id))
    print(f"Flickr8k train captions, {torch.get_num_threads()} torch threads, {args.rounds} rounds of {args.steps} "
          f"steps alternated, median tokens/s")
    frozen = statistics.median(rates["frozen"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:>18}: {rate:8,.0f} tok/s; a training epoch costs {frozen / rate:.2f}x a frozen one; "
              f"features {extraction_s[name]:.0f} s")


def matmul_peak(dtype, n: int = 2048, reps: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def training_flop_per_token(cfg, positions: int) -> float:
    """Matrix-product FLOPs per predicted word of the attention decoder over a grid of `positions`, forward and
    backward (3x forward)."""
    e, h, a, c, v = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, cfg.context_dim, cfg.vocab_size
    forward = 2 * ((e + c + h) * 4 * h + h * a + h * c + positions * a + positions * c + h * v)
    return 3 * forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--rows", default="recipe,before,pooled,scst")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_flickr8k"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--scst-epochs", type=int, default=4)
    ap.add_argument("--scst-base", default="recipe", choices=sorted(ROWS), help="the row SCST rows start from")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--guidance", action="store_true", help="score with the classifier's guidance on (default: "
                    "off, the model alone; benchmarks/bench_guidance.py compares the two)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed", action="store_true", help="training tokens/s only (see above)")
    ap.add_argument("--speed-finetune", action="store_true", help="tokens/s frozen against fine-tuned (see above)")
    ap.add_argument("--ship", help="write this row's model to exported/flickr8k (the bundle capcli ships)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    if not (args.dataset / "Images").is_dir():
        sys.exit(f"error: no Flickr8k folder at {args.dataset} (give --dataset PATH)")
    if args.speed:
        speed(args)
        return
    if args.speed_finetune:
        speed_finetune(args)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in (*ROWS, *SCST_ROWS)]
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(unknown)}; choose from {', '.join([*ROWS, *SCST_ROWS])}")
    results = {}
    for name in rows:
        if name in SCST_ROWS:
            run, wall = scst_row(name, train_row(args.scst_base, ROWS[args.scst_base], args)[0], args)
        else:
            run, wall = train_row(name, ROWS[name], args)
        results[name] = {**score_row(run, args), "train_wall_s": wall}
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'bundle'})}", flush=True)
        if name == args.ship:
            print(f"shipped: {ship(name, run, results[name], args)}", flush=True)
    print(f"\nFlickr8k val (1,000 photos), ONNX Runtime, beam {args.beam}, {args.backbone}; scores 0-100")
    print_rows(results)


if __name__ == "__main__":
    main()
