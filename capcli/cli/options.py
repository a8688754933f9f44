"""Option types shared by several commands."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.runtime.captioner import MAX_BEAM

Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Provider = Annotated[str, typer.Option(help="ONNX Runtime provider: auto, cpu or cuda.")]
BackboneName = Annotated[str, typer.Option("--backbone", help="Backbone plugin name (see capcli backbones).")]
DatasetSpec = Annotated[str, typer.Option("--dataset", help="synthetic, flickr8k, flickr30k or a path.")]
ImagesDir = Annotated[str | None, typer.Option("--images", help="Image folder, when apart from the annotations.")]
Weights = Annotated[str, typer.Option(help="'imagenet' (download), 'none' (random) or a state-dict path.")]
Engine = Annotated[
    str, typer.Option(help="Feature extraction: auto (ONNX Runtime on CPU, PyTorch on CUDA), torch or onnx.")
]
AllowUnk = Annotated[
    bool, typer.Option("--allow-unk", help="Let captions hold <unk> (suppressed by default: the model's 'lost' word).")
]
# Options that size memory are bounded, so that a typo is one line rather than an allocation traceback; the beam
# (MAX_BEAM) as `capcli serve`'s API bounds it.
MAX_DECODE_BATCH = 1024  # images decoded together (caption)
BeamSize = Annotated[int, typer.Option(min=1, max=MAX_BEAM, help=f"1 = greedy; at most {MAX_BEAM}.")]
NoRepeatNgram = Annotated[
    int, typer.Option(min=0, max=20, help="No n-gram twice in a caption (0: off; default 3).")
]
ResizeMode = Annotated[
    str, typer.Option(help="How photos are framed: crop (shorter side, then the centre), squash (both sides, then "
                           "the centre) or auto (squash when the training images are square).")
]
Split = Annotated[
    str | None, typer.Option(help="The backbone's split point for --finetune (default: its first; see capcli "
                                  "backbones).")
]
Guidance = Annotated[
    bool, typer.Option("--guidance/--no-guidance",
                       help="Let the backbone's classifier steer the words (models whose encoder returns classes).")
]
Constrain = Annotated[
    bool, typer.Option("--constrain",
                       help="With guidance: a beam-searched caption must name the word the classes support most "
                            "(constrained beam search; slower).")
]


def guide_options(guidance: bool, constrain: bool, searching: bool = True):
    """The GuideOptions of --guidance/--no-guidance and --constrain (`searching`: beam search, not greedy or
    sampled decoding, which cannot be constrained)."""
    from dataclasses import replace

    from capcli.errors import CapcliError
    from capcli.runtime.captioner import DEFAULT_GUIDANCE, NO_GUIDANCE

    if constrain and not guidance:
        raise CapcliError("--constrain needs guidance (drop --no-guidance)")
    if constrain and not searching:
        raise CapcliError("--constrain needs beam search (--beam-size 2 or more, without --sample)")
    if not guidance:
        return NO_GUIDANCE
    return replace(DEFAULT_GUIDANCE, constrain=True) if constrain else DEFAULT_GUIDANCE


def check_constrain(captioner, model) -> None:
    """--constrain for a model without a classifier is one clear error, not captions that ignore it."""
    from capcli.errors import CapcliError
    from capcli.guidance import can_guide, no_classifier

    if not can_guide(captioner):
        raise CapcliError(f"--constrain: {no_classifier(model, getattr(captioner, 'classifier', None))}; "
                          "drop --constrain")
