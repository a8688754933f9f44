"""Caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR) computed with pycocoevalcap, on the 0-100 scale."""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field

TOKENIZERS = ("auto", "ptb", "simple")

# Letters and digits, keeping words joined by a hyphen or an apostrophe ("black-and-white", "dog's") whole,
# as the PTB tokenizer mostly does; everything else is punctuation and dropped.
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


@dataclass
class Scores:
    values: dict[str, float]  # "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR" when computed; 0-100
    tokenizer: str  # "ptb" or "simple"
    skipped: list[str] = field(default_factory=list)  # e.g. "METEOR (java not found)"
    n_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def java_available() -> bool:
    """Whether a `java` executable is on PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Lowercase and split off punctuation, without java: the fallback for the PTB tokenizer."""
    return " ".join(_WORD.findall(text.lower()))


def score_captions(
    references: dict[str, list[str]],
    candidates: dict[str, str],
    meteor: bool | None = None,
    tokenizer: str = "auto",
) -> Scores:
    """Score one candidate caption per image against its references.

    meteor: None = when java is present, True = wanted (reported as skipped without java), False = never.
    tokenizer: "ptb" (pycocoevalcap's, needs java), "simple" (pure Python) or "auto" (ptb when java is found).
    """
    _check_inputs(references, candidates)
    skipped: list[str] = []
    gts, res, used = _tokenize(references, candidates, tokenizer, skipped)
    values = _coco_scores(gts, res)
    if meteor is False:
        skipped.append("METEOR (disabled)")
    elif not java_available():
        skipped.append("METEOR (java not found)")
    else:
        _add_meteor(values, gts, res, skipped)
    return Scores(values=values, tokenizer=used, skipped=skipped, n_images=len(candidates))


def _check_inputs(references: dict[str, list[str]], candidates: dict[str, str]) -> None:
    if not candidates:
        raise ValueError("no captions to score")
    missing_refs = sorted(set(candidates) - set(references))
    missing_cands = sorted(set(references) - set(candidates))
    if missing_refs or missing_cands:
        raise ValueError(
            "candidates and references must cover the same images: "
            f"{len(missing_refs)} without references (e.g. {missing_refs[:3]}), "
            f"{len(missing_cands)} without a candidate (e.g. {missing_cands[:3]})"
        )
    empty = sorted(k for k, refs in references.items() if not refs)
    if empty:
        raise ValueError(f"{len(empty)} image(s) have no reference captions (e.g. {empty[:3]})")


def _tokenize(
    references: dict[str, list[str]], candidates: dict[str, str], tokenizer: str, skipped: list[str]
) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """Tokenized references and candidates in pycocoevalcap's shape, and the tokenizer's name."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
    if tokenizer == "ptb" and not java_available():
        raise ValueError("the 'ptb' tokenizer needs java, which was not found; use 'simple'")
    captions = {("ref", k): list(v) for k, v in references.items()}
    captions |= {("cand", k): [v] for k, v in candidates.items()}
    used = "ptb" if tokenizer == "ptb" or (tokenizer == "auto" and java_available()) else "simple"
    if used == "ptb":
        try:
            tokens = _ptb(captions)
        except (OSError, RuntimeError) as exc:
            if tokenizer == "ptb":
                raise
            skipped.append(f"PTB tokenizer ({exc}); used the simple tokenizer")
            used = "simple"
    if used == "simple":
        tokens = {key: [simple_tokenize(c) for c in caps] for key, caps in captions.items()}
    gts = {k: tokens[("ref", k)] for k in references}
    res = {k: tokens[("cand", k)] for k in candidates}
    return gts, res, used


def _ptb(captions: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    """pycocoevalcap's PTB tokenizer, robust to empty captions.

    It tokenizes one caption per line, so empty captions (which may vanish) are kept out of its input and
    anything Python or Java could read as a line break is folded into a space first.
    """
    flat = [(key, i, " ".join(c.split())) for key, caps in captions.items() for i, c in enumerate(caps)]
    tokens = {key: [""] * len(caps) for key, caps in captions.items()}
    texts = [(key, i, text) for key, i, text in flat if text]
    if texts:
        out = _run_ptb([text for _, _, text in texts])
        for (key, i, _), line in zip(texts, out, strict=True):
            tokens[key][i] = line
    return tokens


def _run_ptb(lines: list[str]) -> list[str]:
    """What pycocoevalcap's PTBTokenizer.tokenize does, with its input file in a temporary folder rather than
    beside its jar in site-packages (read-only in many installs) and java's progress line kept off the
    terminal."""
    import subprocess
    import tempfile
    from pathlib import Path

    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="capcli-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_bytes("\n".join(lines).encode())
        proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"java exited with {proc.returncode}{': ' + said[-1] if said else ''}")
    out = proc.stdout.decode().split("\n")
    if len(out) < len(lines):
        raise RuntimeError("PTB tokenizer output did not line up with its input")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
            for line in out[:len(lines)]]


def _coco_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    values = {f"BLEU-{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    values["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    # The coco-caption CIDEr (clipped counts, length penalty, sigma 6) is CIDEr-D. It fails outright when no
    # reference has a single word, where 0 is the honest answer.
    has_words = any(ref.split() for refs in gts.values() for ref in refs)
    values["CIDEr-D"] = 100.0 * float(Cider().compute_score(gts, res)[0]) if has_words else 0.0
    return values


def _add_meteor(
    values: dict[str, float], gts: dict[str, list[str]], res: dict[str, list[str]], skipped: list[str]
) -> None:
    """METEOR through its java process; a failure is reported as skipped, never fatal."""
    from pycocoevalcap.meteor.meteor import Meteor

    # "|||" separates fields in METEOR's stdin protocol.
    gts = {k: [r.replace("|||", " ") for r in refs] for k, refs in gts.items()}
    try:
        scorer = Meteor()
    except OSError as exc:
        skipped.append(f"METEOR (could not start java: {exc})")
        return
    try:
        values["METEOR"] = 100.0 * float(scorer.compute_score(gts, res)[0])
    except (OSError, ValueError) as exc:
        skipped.append(f"METEOR (failed: {exc})")
    finally:
        _close_meteor(scorer)


def _close_meteor(scorer: object) -> None:
    """Stop the java process; release the lock a failed call left held, or its __del__ would hang."""
    lock = scorer.lock  # type: ignore[attr-defined]
    if lock.locked():
        lock.release()
    proc = scorer.meteor_p  # type: ignore[attr-defined]
    proc.stdin.close()
    proc.kill()
    proc.wait()
