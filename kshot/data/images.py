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
#: Largest side of a model's input images (a 3 x 1024 x 1024 batch of 256 is already 3 GiB).
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class ImageFormat:
    """What a model's input images look like.

    Args:
        channels: 1 (grey) or 3 (RGB).
        size: side of the square image after resizing.
        invert: the model reads strokes bright on a dark ground (Omniglot), while drawings and
            scans are usually dark on light. Each image's ground is judged from its border
            (:func:`has_light_ground`): an image with a light ground is inverted, one whose ground
            is already dark is kept, so both polarities reach the model the same way.
    """

    channels: int
    size: int
    invert: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels, not {self.channels}")
        if not 1 <= self.size <= MAX_IMAGE_SIZE:
            raise DataError(f"image size must be between 1 and {MAX_IMAGE_SIZE} pixels, not {self.size}")

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
        return self.array_and_inverted(image)[0]

    def array_and_inverted(self, image) -> tuple[np.ndarray, bool]:
        """:meth:`array`, and whether the image was inverted (``invert`` and a light ground)."""
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
        inverted = self.invert and has_light_ground(array)
        if inverted:
            array = 255 - array
        return (array[None] if self.channels == 1 else array.transpose(2, 0, 1).copy()), inverted

    def convert(self, image) -> torch.Tensor:
        """A PIL image as float32 ``[C, size, size]`` in [0, 1]."""
        return torch.from_numpy(np.ascontiguousarray(self.array(image))).float().div_(255.0)

    def read_array(self, path: str | os.PathLike) -> np.ndarray:
        """Read one image file as uint8 ``[C, size, size]``; unreadable files are a DataError."""
        return self.read_array_and_inverted(path)[0]

    def read_array_and_inverted(self, path: str | os.PathLike) -> tuple[np.ndarray, bool]:
        """:meth:`read_array`, and whether the image was inverted (see ``invert``)."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            with Image.open(path) as image:
                image.load()
                return self.array_and_inverted(image)
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


def has_light_ground(array: np.ndarray) -> bool:
    """Whether an image (uint8 ``[H, W]`` or ``[H, W, 3]``) has a light ground: the median of its
    border (the outer sixteenth on each side), where drawings and scans have no strokes, is in
    the upper half of the grey scale."""
    grey = array.mean(-1) if array.ndim == 3 else array
    h, w = grey.shape
    k = max(1, min(h, w) // 16)
    border = np.concatenate([grey[:k].ravel(), grey[-k:].ravel(), grey[:, :k].ravel(), grey[:, -k:].ravel()])
    return bool(np.median(border) >= 128)


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Integer images above 8 bits are taken as 16-bit; float images as [0, 1] (or [0, max])."""
    top = float(values.max()) if values.size else 0.0
    if mode == "F":
        scale = 255.0 / (top if top > 1.0 else 1.0)
    else:
        scale = 255.0 / 65535.0 if top > 255 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
