"""capcli: train CNN+LSTM image-captioning models, export them to ONNX, caption with ONNX Runtime.

The Python API is what `__all__` lists; everything else in the package is private:

```python
import capcli

result = capcli.load().caption("photo.jpg")
print(result.caption)
```

`import capcli` stays cheap: the API (`capcli.api`, with numpy, Pillow and ONNX Runtime behind it) is imported
on first use of one of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Alternative", "CapcliError", "CaptionResult", "Captioner", "GuideOptions", "ImageClasses", "ImageError",
           "ImageInput", "WordAttention", "__version__", "load"]

if TYPE_CHECKING:  # for type checkers and the documentation; at run time __getattr__ imports them when first used
    from capcli.api import (
        Alternative,
        CapcliError,
        Captioner,
        CaptionResult,
        GuideOptions,
        ImageClasses,
        ImageError,
        ImageInput,
        WordAttention,
        load,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from capcli import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'capcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
