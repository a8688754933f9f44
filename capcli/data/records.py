"""The in-memory form of a captioning dataset, whatever file format it came from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
FORMATS = ("kaggle", "flickr8k_token", "karpathy", "coco", "flickr30k_csv")


@dataclass
class CaptionDataset:
    """Captions per image and the train/val/test split of the images.

    `captions` keys are image file names relative to `images_dir`, in sorted order; every image
    is in exactly one split, so no image's captions cross splits.
    """

    name: str
    format: str
    annotation: Path
    images_dir: Path
    captions: dict[str, list[str]]
    splits: dict[str, list[str]]
    # Things the reader skipped or repaired, one line each (shown by `capcli data info`).
    notes: list[str] = field(default_factory=list)

    def image_path(self, image: str) -> Path:
        return self.images_dir / image

    @property
    def images(self) -> list[str]:
        return sorted(self.captions)

    def fingerprint(self) -> str:
        """A short content hash: changes when the format, the images or any caption changes."""
        digest = hashlib.sha256()
        digest.update(self.format.encode("utf-8"))
        for image in self.images:
            digest.update(
                b"\0" + json.dumps([image, self.captions[image]], ensure_ascii=False).encode("utf-8")
            )
        return digest.hexdigest()[:16]
