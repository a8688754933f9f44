"""A split's captions as training and validation read them: a feature row and padded token ids per caption."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capcli.errors import CapcliError


@dataclass
class CaptionTable:
    """Encoded captions of one split: feature row per caption and padded token ids."""

    rows: torch.Tensor  # [M] int64 index into the feature array
    tokens: torch.Tensor  # [M, T] int64, <start> ... <end> <pad>...
    images: list[str]  # the split's usable images, for generation
    references: dict[str, list[str]]


def encode_split(ds, split: str, vocab, cache, max_len: int) -> CaptionTable:
    row_of = cache.row_index()
    rows, seqs, images, refs = [], [], [], {}
    for image in ds.splits[split]:
        if image in cache.failed or image not in row_of:
            continue
        images.append(image)
        refs[image] = ds.captions[image]
        for caption in ds.captions[image]:
            rows.append(row_of[image])
            seqs.append(vocab.encode(caption, max_len=max_len))
    if not seqs:
        raise CapcliError(no_usable_captions(ds, split, cache))
    tokens = torch.full((len(seqs), max(map(len, seqs))), vocab.pad_id, dtype=torch.long)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = torch.tensor(seq)
    return CaptionTable(torch.tensor(rows), tokens, images, refs)


def no_usable_captions(ds, split: str, cache) -> str:
    """Why a split has nothing to train or validate on, and what to do about it."""
    names = ds.splits[split]
    if not names:
        return f"the {split} split has no images: the dataset is too small or its split lists leave it empty"
    reason = cache.failed.get(names[0], f"{names[0]}: not in the feature cache")
    return (
        f"the {split} split has no usable captions: none of its {len(names)} images could be read "
        f"(first: {reason}); images are read from {ds.images_dir}: put them there or pass --images DIR "
        "(capcli data info lists the missing ones), then rerun: failed images are retried"
    )
