"""CIDEr-D as a reward: pycocoevalcap's formula, with the references' statistics computed once.

pycocoevalcap's `Cider` (the coco-caption CIDEr-D: sigma 6 length penalty, clipped tf-idf, x10, n = 1..4)
recomputes document frequencies and every reference vector on each call. Self-critical training scores
thousands of sampled captions per epoch against the same training references, so `CiderD` does that
work once: document frequencies when it is built, each image's reference vectors the first time the
image is scored. A candidate's vector is a dict of n-gram -> tf-idf weight, compared with each reference
by the very arithmetic of pycocoevalcap's `CiderScorer` (its quirks included: the length in the
Gaussian penalty counts bigrams, and n-grams missing from the references count as seen in one image),
so a score equals pycocoevalcap's to rounding when the frequencies come from the same references.

Text is tokenised as `capcli.metrics` does with tokenizer="simple", so the reward is the number that
`generated_scores` and `capcli evaluate --tokenizer simple` report for greedy captions.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from capcli.metrics import simple_tokenize

N = 4  # n-grams of 1..4 words
SIGMA = 6.0  # width of the Gaussian length penalty

# A caption's tf-idf weights (one dict per n-gram order), the norm of each order's part, and its "length".
Vector = tuple[tuple[dict[tuple[str, ...], float], ...], tuple[float, ...], int]


def ngrams(words: Sequence[str], n: int = N) -> Counter:
    """Counts of every 1..n-gram of a tokenised caption."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of candidate captions against per-image references, with document frequencies fixed once.

    `references`: {image: [reference captions]}, raw text. Its images are the documents: an n-gram's
    document frequency is the number of images whose references contain it, and log(len(references))
    is the idf's numerator. Built from the training references it scores rewards; built from the very
    captions being judged it reproduces pycocoevalcap's corpus CIDEr-D (see `corpus_score`).
    """

    def __init__(self, references: Mapping[str, Iterable[str]], n: int = N, sigma: float = SIGMA):
        if not references:
            raise ValueError("CIDEr-D needs at least one image's references for its document frequencies")
        self.n, self.sigma = n, sigma
        self.references = {image: [simple_tokenize(r).split() for r in refs] for image, refs in references.items()}
        self.df: Counter = Counter()
        for refs in self.references.values():
            self.df.update({g for words in refs for g in ngrams(words, n)})
        self.log_documents = math.log(float(len(self.references)))
        self._ref_vectors: dict[str, list[Vector]] = {}

    def vector(self, counts: Counter) -> Vector:
        """tf-idf weights of a caption's n-grams, the norm of each order's part, and its length.

        As pycocoevalcap: an n-gram no reference holds gets a document frequency of 1, and the "length"
        is the number of bigrams (its counter looks at n-grams of index 1).
        """
        weights: tuple[dict, ...] = tuple({} for _ in range(self.n))
        squares, length = [0.0] * self.n, 0
        for gram, tf in counts.items():
            weight = float(tf) * (self.log_documents - math.log(max(1.0, float(self.df.get(gram, 0.0)))))
            weights[len(gram) - 1][gram] = weight
            squares[len(gram) - 1] += weight * weight
            if len(gram) == 2:
                length += tf
        return weights, tuple(math.sqrt(s) for s in squares), length

    def reference_vectors(self, image: str) -> list[Vector]:
        vectors = self._ref_vectors.get(image)
        if vectors is None:
            if image not in self.references:
                raise KeyError(f"no references for image {image!r}")
            vectors = [self.vector(ngrams(words, self.n)) for words in self.references[image]]
            self._ref_vectors[image] = vectors
        return vectors

    def score(self, image: str, caption: str) -> float:
        """CIDEr-D of one caption (raw text) against the image's references, on pycocoevalcap's scale (x10)."""
        return self._score(self.vector(ngrams(simple_tokenize(caption).split(), self.n)), image)

    def scores(self, images: Sequence[str], captions: Sequence[str]) -> list[float]:
        """One score per (image, caption) pair; a caption sampled twice for one image is scored once."""
        seen: dict[tuple[str, str], float] = {}
        result = []
        for image, caption in zip(images, captions, strict=True):
            key = (image, caption)
            if key not in seen:
                seen[key] = self.score(image, caption)
            result.append(seen[key])
        return result

    def _score(self, candidate: Vector, image: str) -> float:
        weights, norms, length = candidate
        refs = self.reference_vectors(image)
        total = [0.0] * self.n
        for ref_weights, ref_norms, ref_length in refs:
            penalty = math.exp(-(float(length - ref_length) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                total[k] += self._similarity(weights[k], ref_weights[k], norms[k], ref_norms[k]) * penalty
        return sum(total) / self.n / len(refs) * 10.0

    @staticmethod
    def _similarity(weights: dict, ref_weights: dict, norm: float, ref_norm: float) -> float:
        """Clipped cosine of one order's parts: sum min(w_cand, w_ref) * w_ref / (|cand| |ref|)."""
        value = 0.0
        for gram, weight in weights.items():
            ref = ref_weights.get(gram, 0.0)
            value += min(weight, ref) * ref
        if norm != 0 and ref_norm != 0:
            value /= norm * ref_norm
        return value

    def corpus_score(self, candidates: Mapping[str, str]) -> float:
        """Mean CIDEr-D over {image: caption}: pycocoevalcap's corpus score when built from these images' references."""
        return sum(self.score(image, caption) for image, caption in candidates.items()) / len(candidates)
