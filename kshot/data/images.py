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

    def array(self, image) -> np.ndarray:
        """A PIL image as uint8 ``[C, size, size]`` (the form caches keep).

        Transparent pixels are laid on white (what a viewer shows), photos are turned upright by
        their EXIF orientation, 16-bit and float images are scaled to 8 bits, and the image is
        resized (not cropped) to a square.
        """
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(image)
        if image.mode == "F" or image.mode.startswith("I"):
            image = Image.fromarray(_to_8bit(np.asarray(image, dtype=np.float64), image.mode), "L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
            rgba = image.convert("RGBA")
            ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(ground, rgba)
        image = image.convert("L" if self.channels == 1 else "RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
        if self.invert:
            array = 255 - array
        return array[None] if self.channels == 1 else array.transpose(2, 0, 1).copy()

    def convert(self, image) -> torch.Tensor:
        """A PIL image as float32 ``[C, size, size]`` in [0, 1]."""
        return torch.from_numpy(np.ascontiguousarray(self.array(image))).float().div_(255.0)

    def read_array(self, path: str | os.PathLike) -> np.ndarray:
        """Read one image file as uint8 ``[C, size, size]``; unreadable files are a DataError."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            with Image.open(path) as image:
                image.load()
                return self.array(image)
        except FileNotFoundError:
            raise DataError(f"image {path} not found") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError,
                EOFError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0].replace(f" {str(path)!r}", "")[:120]
            raise DataError(f"cannot read image {path}: {reason}") from None

    def read(self, path: str | os.PathLike) -> torch.Tensor:
        """Read one image file as float32 ``[C, size, size]`` in [0, 1]; unreadable files are a
        DataError naming them."""
        return torch.from_numpy(self.read_array(path)).float().div_(255.0)


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Integer images above 8 bits are taken as 16-bit; float images as [0, 1] (or [0, max])."""
    top = float(values.max()) if values.size else 0.0
    if mode == "F":
        scale = 255.0 / (top if top > 1.0 else 1.0)
    else:
        scale = 255.0 / 65535.0 if top > 255 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
