"""Guidance from the backbone's classifier (capcli.guidance), with and without, on Flickr8k val and COCO photos.

Each photo set is encoded once (the bundle's encoder returns the class probabilities beside the grid); then every
setting decodes all of it (beam 3, ONNX Runtime) and is scored with pycocoevalcap (PTB tokenizer; METEOR with
--meteor), beside the count of captions naming a dog that no reference names and the decoding time against
decoding without guidance, alternated in the same run. Settings:
- off: no guidance (`--no-guidance`);
- default: capcli's defaults (`GuideOptions()`: word bonus and the animal guard);
- guard: the guard alone (no bonus); bonus: the bonus alone (no guard);
- bonus=X / support=X / penalty=X / guard=X / common=N: the default with one option changed;
- constrained: constrained beam search (Anderson et al. 2017) on top of the default: the caption must hold the most
  supported confident word, where its support is at least 0.6, when a beam that holds it ends
  (`GuideOptions(constrain=True)`); constrain=X: the same from support X.

    python benchmarks/bench_guidance.py --bundle exported/flickr8k
    python benchmarks/bench_guidance.py --bundle B --sets coco --settings off,default,bonus=5,constrained
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SETS = {"flickr8k": SHARED / "flickr8k", "coco": SHARED / "coco-val2017-dev"}
DOG_WORDS = {"dog", "dogs", "puppy", "puppies"}
METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def options_for(name: str):
    from capcli.guidance import GuideOptions

    base = GuideOptions()
    if name == "off":
        return replace(base, enabled=False)
    if name == "default":
        return base
    if name == "guard":
        return replace(base, bonus=0.0)
    if name == "bonus":
        return replace(base, penalty=0.0)
    if name == "constrained":
        return replace(base, constrain=True)
    key, _, value = name.partition("=")
    if key == "constrain" and value:
        return replace(base, constrain=True, constrain_support=float(value))
    fields = {"bonus": "bonus", "support": "min_support", "penalty": "penalty", "guard": "guard", "common": "common"}
    if key not in fields or not value:
        raise SystemExit(f"unknown setting '{name}'")
    return replace(base, **{fields[key]: int(value) if key == "common" else float(value)})


def encode(captioner, paths: list[Path], chunk: int = 16):
    """(state, context, probs) of every photo, in order."""
    from capcli.images import load_input
    from capcli.runtime.captioner import start_batch_classes

    parts = []
    for i in range(0, len(paths), chunk):
        batch = np.stack([load_input(p, captioner.preprocessing) for p in paths[i : i + chunk]])
        parts.append(start_batch_classes(captioner, batch))
    state = tuple(np.concatenate([p[0][j] for p in parts], axis=1) for j in range(2))
    context = tuple(np.concatenate([p[1][j] for p in parts], axis=0) for j in range(len(parts[0][1])))
    probs = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
    return state, context, probs


def decode_all(captioner, encoded, options, beam: int, batch: int = 50) -> tuple[list[str], float, list]:
    """Every photo's caption with these guidance options, the decoding seconds, and what the classifier said."""
    from capcli.runtime.captioner import decode_hypotheses, guidance_bias

    state, context, probs = encoded
    captions, seconds, seen_all = [], 0.0, []
    n = state[0].shape[1]
    for i in range(0, n, batch):
        part = (tuple(s[:, i : i + batch] for s in state), tuple(c[i : i + batch] for c in context),
                probs[i : i + batch] if probs is not None else None)
        start = time.perf_counter()
        bias, seen = guidance_bias(captioner, part[2], options)
        required = np.array([s.required for s in seen]) if seen and options.constrain else None
        hyps = decode_hypotheses(captioner, part[0], beam, context=part[1], bias=bias, required=required)
        seconds += time.perf_counter() - start
        captions += [captioner.vocab.decode(h[0].tokens) for h in hyps]
        seen_all += seen or [None] * len(hyps)
    return captions, seconds, seen_all


def wrong_dogs(captions: dict[str, str], refs: dict[str, list[str]]) -> int:
    def dogs(text: str) -> bool:
        return bool(DOG_WORDS & set(text.lower().replace(".", " ").split()))

    return sum(dogs(c) and not any(dogs(r) for r in refs[img]) for img, c in captions.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "exported" / "flickr8k"))
    ap.add_argument("--sets", default="flickr8k,coco")
    ap.add_argument("--settings", default="off,default,guard,bonus,constrained")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="decodings of each setting, alternated (median time)")
    ap.add_argument("--limit", type=int, default=0, help="photos per set (0: all of its val split)")
    ap.add_argument("--meteor", action="store_true", help="also METEOR (java; slower)")
    ap.add_argument("--show", type=int, default=0, help="print this many captions per set and setting")
    args = ap.parse_args()

    from capcli.data.readers import load_dataset
    from capcli.metrics import score_captions
    from capcli.runtime.captioner import open_captioner

    captioner = open_captioner(args.bundle, "onnx", provider="cpu")
    if getattr(captioner, "classifier", None) is None:
        raise SystemExit(f"{args.bundle}: its encoder returns no class probabilities (exported before classifiers, "
                         "or a pooled decoder): nothing to measure")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    rows = []
    for set_name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        ds = load_dataset(str(SETS[set_name]))
        names = [n for n in ds.splits["val"] if ds.image_path(n).is_file()]
        names = names[: args.limit] if args.limit else names
        refs = {n: ds.captions[n] for n in names}
        encoded = encode(captioner, [ds.image_path(n) for n in names])
        times: dict[str, list[float]] = {s: [] for s in settings}
        results = {}
        for _round in range(args.rounds):  # alternated, so the timings share the machine's load
            for setting in settings:
                captions, seconds, seen = decode_all(captioner, encoded, options_for(setting), args.beam)
                times[setting].append(seconds)
                results[setting] = (dict(zip(names, captions, strict=True)), seen)
        off = statistics.median(times["off"]) if "off" in times else None
        for setting in settings:
            captions, seen = results[setting]
            scores = score_captions(refs, captions, meteor=args.meteor, tokenizer="ptb").values
            cost = statistics.median(times[setting]) / off if off else float("nan")
            rows.append((set_name, len(names), setting, scores, wrong_dogs(captions, refs), cost))
            for name in names[: args.show]:
                said = seen[names.index(name)]
                print(f"  {set_name} {setting:>12} {name}: {captions[name]}  "
                      f"{said.to_json() if said is not None else ''}")
    print(f"\n{args.bundle}, beam {args.beam}, ONNX Runtime; scores 0-100 (PTB tokenizer)")
    print("| photos | setting | " + " | ".join(METRICS) + " | wrong dogs | decode time / off |")
    print("|" + "---|" * (len(METRICS) + 4))
    for set_name, n, setting, scores, dogs, cost in rows:
        cells = [f"{scores[m]:.1f}" if m in scores else "-" for m in METRICS]
        print(f"| {set_name} ({n}) | {setting} | " + " | ".join(cells) + f" | {dogs} | {cost:.2f}x |")


if __name__ == "__main__":
    main()
