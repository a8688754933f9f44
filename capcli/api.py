"""The Python API: `capcli.load()` opens a model, and its `caption()` captions images.

```python
import capcli

captioner = capcli.load()                       # the shipped Flickr8k model, on ONNX Runtime
result = captioner.caption("photo.jpg")         # a path, a Pillow image or a numpy array
print(result.caption, result.score)
for result in captioner.caption(["a.jpg", "b.jpg"], beam_size=5):
    print(result.image, result.caption, result.alternatives)
```

It is the captioner `capcli caption` and `capcli serve` use (`capcli.runtime.captioner`): the same preprocessing,
the same decoding and guards, so the same options give the same captions. With `runtime="onnx"` (the default)
it needs only ONNX Runtime, numpy and Pillow, and never imports torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TypeAlias, overload

import numpy as np
from PIL import Image

from capcli.errors import CapcliError
from capcli.guidance import GuideOptions, ImageClasses, can_guide, no_classifier
from capcli.images import ImageError, InMemoryImage
from capcli.runtime.captioner import (
    DEFAULT_GUIDANCE,
    MAX_BEAM,
    NO_GUIDANCE,
    Alternative,
    CaptionResult,
    Guards,
    Sampling,
    WordAttention,
    caption_images,
    default_model,
    open_captioner,
)

__all__ = ["Alternative", "CapcliError", "CaptionResult", "Captioner", "GuideOptions", "ImageClasses", "ImageError",
           "ImageInput", "WordAttention", "load"]

ImageInput: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray
"""One image: an image file's path, a Pillow image, or a numpy array (channels last: `[H, W]` grey, `[H, W, 3]`
RGB or `[H, W, 4]` RGBA; uint8 from 0 to 255, or float from 0.0 to 1.0)."""


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    runtime: Literal["onnx", "torch"] = "onnx",
    provider: Literal["auto", "cpu", "cuda"] = "auto",
    device: str = "cpu",
) -> Captioner:
    """Open a model for captioning.

    Args:
        model: A bundle folder made by `capcli export` (or `capcli demo`); with `runtime="torch"`, a run folder
            made by `capcli train` or a bundle whose source checkpoint is at hand. None: the shipped Flickr8k
            model, found as `capcli caption` finds it (`./exported/flickr8k`, else the checkout's own).
        runtime: `"onnx"`: ONNX Runtime, no torch import. `"torch"`: PyTorch, which needs `capcli[train]`.
        provider: ONNX Runtime's execution provider: `"auto"` uses CUDA when a GPU and its libraries are there,
            the CPU otherwise; `"cuda"` where CUDA cannot run is an error saying why.
        device: The PyTorch device for `runtime="torch"`: `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"`.

    Returns:
        The opened model; open it once and caption with it many times.

    Raises:
        CapcliError: No such bundle, a bundle whose files were altered or do not fit its manifest, no shipped
            model, or a provider or device that cannot run.
        ValueError: An unknown runtime.

    Examples:
        ```python
        captioner = capcli.load()                              # the shipped model
        captioner = capcli.load("exported/demo", provider="cpu")
        captioner = capcli.load("runs/demo", runtime="torch")  # a training run, with capcli[train]
        ```
    """
    return Captioner(model, runtime=runtime, provider=provider, device=device)


class Captioner:
    """A model opened for captioning, made by [`capcli.load`][capcli.api.load].

    Attributes:
        model: The bundle (or run) folder it was opened from.
        runtime: `"onnx"` or `"torch"`.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, runtime: Literal["onnx", "torch"] = "onnx",
                 provider: Literal["auto", "cpu", "cuda"] = "auto", device: str = "cpu") -> None:
        if runtime not in ("onnx", "torch"):
            raise ValueError(f"runtime must be 'onnx' or 'torch', not {runtime!r}")
        self.model: Path = Path(model) if model is not None else default_model()
        self.runtime: str = runtime
        self._captioner = open_captioner(self.model, runtime=runtime, provider=provider, device=device)

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime's execution providers in use, first tried first (empty with `runtime="torch"`)."""
        return list(getattr(self._captioner, "providers", []))

    @property
    def grid(self) -> tuple[int, int] | None:
        """The attention grid's (height, width) for a model with the attention decoder, whose results carry
        `attention`; None for a pooled decoder."""
        grid = self._captioner.grid
        return None if grid is None else (grid.height, grid.width)

    @property
    def classifier(self) -> str | None:
        """The label set of the ImageNet classes the model's encoder returns beside its grid (e.g.
        `"imagenet-1k"`), which guidance turns into words; None for a model without them (then `guidance` does
        nothing)."""
        head = getattr(self._captioner, "classifier", None)
        return head["labels"] if head else None

    def __repr__(self) -> str:
        return f"Captioner(model={str(self.model)!r}, runtime={self.runtime!r}, providers={self.providers!r})"

    @overload
    def caption(self, images: ImageInput, *, beam_size: int = 3, n_best: int | None = None, sample: bool = False,
                temperature: float = 1.0, top_k: int = 0, seed: int = 0, allow_unk: bool = False,
                no_repeat_ngram: int = 3, batch_size: int = 8, guidance: bool | GuideOptions = True,
                errors: Literal["raise", "keep"] = "raise") -> CaptionResult: ...

    @overload
    def caption(self, images: Iterable[ImageInput], *, beam_size: int = 3, n_best: int | None = None,
                sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                allow_unk: bool = False, no_repeat_ngram: int = 3, batch_size: int = 8,
                guidance: bool | GuideOptions = True,
                errors: Literal["raise", "keep"] = "raise") -> list[CaptionResult]: ...

    def caption(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        beam_size: int = 3,
        n_best: int | None = None,
        sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        allow_unk: bool = False,
        no_repeat_ngram: int = 3,
        batch_size: int = 8,
        guidance: bool | GuideOptions = True,
        errors: Literal["raise", "keep"] = "raise",
    ) -> CaptionResult | list[CaptionResult]:
        """Caption one image, or each of several.

        Args:
            images: One image (a path, a Pillow image or a numpy array: [`ImageInput`][capcli.api.ImageInput]),
                or a list (any iterable) of them.
            beam_size: Beam search's width, from 1 (greedy decoding) to 16.
            n_best: How many of the beam's captions each result keeps in `alternatives`, best first (at most
                `beam_size`). None: all `beam_size` of them under beam search, none with greedy decoding or
                sampling.
            sample: Sample each word from the model's distribution instead of searching (one caption per image).
            temperature: Sampling's softmax temperature, from 0.001 to 100 (lower: closer to greedy).
            top_k: Sample among the k likeliest words (0: all words).
            seed: Sampling's random seed: the same seed gives the same captions.
            allow_unk: Let captions hold `<unk>`, which is never generated by default.
            no_repeat_ngram: No n-gram of this length twice in a caption (0: off).
            batch_size: Images decoded together (they are encoded 16 at a time).
            guidance: Let the backbone's ImageNet classifier steer the words, for models whose encoder returns
                classes (`Captioner.classifier`): True for capcli's defaults (a bonus for words the classes
                support, an animal no class supports held back), False to decode from the caption model alone,
                or a [`GuideOptions`][capcli.guidance.GuideOptions] (e.g. `GuideOptions(constrain=True)`: the
                caption must hold the most supported word). Each result's `classes` shows what was used.
            errors: An image that cannot be read (missing, not an image, too large): `"raise"` raises
                `ImageError` naming it; `"keep"` gives it a result whose `error` says why (and whose `caption`
                is None) while the other images are captioned.

        Returns:
            For one image, its result; for a list, a list of results in the same order.

        Raises:
            ImageError: An image could not be read, with `errors="raise"`.
            TypeError: Something that is not an image.
            ValueError: An option out of range, `n_best` > 1 without beam search, or `GuideOptions(constrain=True)`
                without beam search or for a model without a classifier (`Captioner.classifier` is None).

        Examples:
            ```python
            result = captioner.caption("photo.jpg")
            print(result.caption, result.score)
            for caption, score in result.alternatives:   # the beam's captions, best first
                print(caption, score)
            for word, weights in result.attention:       # attention models: each word's weights
                print(word, weights.reshape(captioner.grid).argmax())   # over the grid's cells

            results = captioner.caption(sorted(Path("photos").glob("*.jpg")), beam_size=1)  # greedy
            results = captioner.caption(photos, errors="keep")   # unreadable ones: result.error
            ```
        """
        single = isinstance(images, str | bytes | os.PathLike | Image.Image | np.ndarray) or not isinstance(
            images, Iterable)
        items = [images] if single else list(images)  # type: ignore[arg-type]
        sources = [_source(item, index) for index, item in enumerate(items)]
        sampling, n_best = _check_options(beam_size, n_best, sample, temperature, top_k, seed, no_repeat_ngram,
                                          batch_size, errors)
        guide = _guidance_options(guidance, searching=not sample and beam_size > 1)
        if guide.constrain and not can_guide(self._captioner):
            raise ValueError(f"GuideOptions(constrain=True): "
                             f"{no_classifier(self.model, getattr(self._captioner, 'classifier', None))}")

        def stop_at_error(result: CaptionResult) -> None:
            if errors == "raise" and result.error is not None:
                raise ImageError(result.error)

        results = caption_images(
            self._captioner, sources, beam_size=beam_size, batch_size=batch_size, n_best=n_best,
            on_result=stop_at_error, sampling=sampling, attention=self._captioner.grid is not None,
            guards=Guards(suppress_unk=not allow_unk, no_repeat_ngram=no_repeat_ngram),
            guidance=guide,
        ) if sources else []
        return results[0] if single else results


def _source(item: object, index: int) -> str | InMemoryImage:
    if isinstance(item, str | os.PathLike):
        path = os.fspath(item)
        if isinstance(path, str):
            return path
    elif isinstance(item, Image.Image | np.ndarray):
        return InMemoryImage(f"<image {index}>", item)
    raise TypeError(f"image {index}: expected a path, a Pillow image or a numpy array, not {type(item).__name__} "
                    "(for a file's bytes: PIL.Image.open(io.BytesIO(data)))")


def _guidance_options(guidance: object, searching: bool) -> GuideOptions:
    if isinstance(guidance, GuideOptions):
        if guidance.enabled and guidance.constrain and not searching:
            raise ValueError("GuideOptions(constrain=True) needs beam search (beam_size 2 or more, sample=False)")
        return guidance
    if isinstance(guidance, bool):
        return DEFAULT_GUIDANCE if guidance else NO_GUIDANCE
    raise ValueError(f"guidance must be True, False or a GuideOptions, not {guidance!r}")


def _check_options(beam_size: int, n_best: int | None, sample: bool, temperature: float, top_k: int, seed: int,
                   no_repeat_ngram: int, batch_size: int, errors: str) -> tuple[Sampling | None, int]:
    """The options `capcli caption` checks, as ValueErrors -> (sampling or None, n_best)."""
    for name, value, low in (("beam_size", beam_size, 1), ("top_k", top_k, 0), ("seed", seed, 0),
                             ("no_repeat_ngram", no_repeat_ngram, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
    if beam_size > MAX_BEAM:
        raise ValueError(f"beam_size must be at most {MAX_BEAM} (as in capcli caption and the server), not {beam_size}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and 1e-3 <= temperature <= 100):
        raise ValueError(f"temperature must be from 0.001 to 100, not {temperature!r}")
    if errors not in ("raise", "keep"):
        raise ValueError(f"errors must be 'raise' or 'keep', not {errors!r}")
    searching = not sample and beam_size > 1
    if n_best is None:
        n_best = beam_size if searching else 1
    elif not isinstance(n_best, int) or isinstance(n_best, bool) or n_best < 1:
        raise ValueError(f"n_best must be an integer >= 1, not {n_best!r}")
    elif n_best > 1 and not searching:
        raise ValueError(f"n_best={n_best} needs beam search: {'sampling' if sample else 'greedy decoding'} "
                         "gives one caption per image")
    elif n_best > beam_size:
        raise ValueError(f"n_best={n_best} asked for, but beam search keeps beam_size={beam_size} captions")
    return (Sampling(float(temperature), top_k, seed) if sample else None), n_best
