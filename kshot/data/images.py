"""Image files to tensors in exactly the form a trained model expects.

A model trained on Omniglot sees 1x28x28 images with bright strokes on a dark ground; one
trained on mini-ImageNet sees 3x84x84 colour images. :class:`ImageFormat` records that form
(it is saved in every checkpoint), and :meth:`ImageFormat.read` converts any common image
file (PNG, JPEG, BMP, GIF, TIFF, WebP; any size; colour, grey or palette) to it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kshot.errors import DataError

#: File endings treated as images when scanning folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


@dataclass(frozen=True)
class ImageFormat:
    """What a model's input images look like.

    Args:
        channels: 1 (grey) or 3 (RGB).
        size: side of the square image after resizing.
        invert: model images are the negative of ordinary pictures (Omniglot: strokes bright on a
            dark ground, while the files are black strokes on white).
    """

    channels: int
    size: int
    invert: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels, not {self.channels}")
        if self.size < 1:
            raise DataError(f"image size must be positive, not {self.size}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageFormat":
        return cls(int(data["channels"]), int(data["size"]), bool(data.get("invert", False)))

    def convert(self, image) -> torch.Tensor:
        """A PIL image as float32 ``[C, size, size]`` in [0, 1]."""
        from PIL import Image

        image = image.convert("L" if self.channels == 1 else "RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
        if self.invert:
            array = 255 - array
        x = torch.from_numpy(array.copy()).float().div_(255.0)
        return x.unsqueeze(0) if self.channels == 1 else x.permute(2, 0, 1).contiguous()

    def read(self, path: str | os.PathLike) -> torch.Tensor:
        """Read one image file; an unreadable or non-image file is a DataError naming it."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            with Image.open(path) as image:
                image.load()
                return self.convert(image)
        except FileNotFoundError:
            raise DataError(f"image {path} not found") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {path}: {str(e).splitlines()[0][:120]}") from None
