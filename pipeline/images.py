"""Reading input images, whatever their format and mode, into plain uint8 arrays.

Contract: files are opened read-only and never changed. Every failure is a `BadImageError`
naming the file and the fix. Colour arrays are RGB(A) uint8; 16-bit images are scaled to 8 bits
(not clipped), palette and LA images keep their transparency, CMYK is converted, EXIF
orientation is applied.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from .errors import BadImageError, InputFolderError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jfif"}
)
# Pillow's own default bomb limit; anything larger is refused before it is decoded.
MAX_PIXELS = 89_478_485
SKIP_HINT = "replace or remove the file, or pass --skip-bad to skip it"


@dataclass(frozen=True)
class Listing:
    """The image files of a folder (sorted by name) and the other files that were ignored."""

    images: tuple[Path, ...]
    ignored: tuple[Path, ...]


def list_images(folder: str | Path, what: str = "images") -> Listing:
    """Image files directly in `folder`, by extension, sorted; hidden files are left out."""
    folder = Path(folder)
    if not folder.exists():
        raise InputFolderError(f"{what} folder does not exist: {folder}")
    if not folder.is_dir():
        raise InputFolderError(f"{what} folder is not a folder: {folder}")
    images, ignored = [], []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(p)
    if not images:
        extra = f" ({len(ignored)} other files ignored)" if ignored else ""
        raise InputFolderError(
            f"no images in {what} folder: {folder}{extra}; "
            f"expected {', '.join(sorted(IMAGE_EXTENSIONS))} files"
        )
    return Listing(tuple(images), tuple(ignored))


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image (EXIF orientation applied); refuse bombs and damage."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)", SKIP_HINT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(
                    path,
                    f"image too large ({w}x{h} = {w * h:,} pixels, limit {max_pixels:,})",
                    "it may be a decompression bomb; downscale it first or " + SKIP_HINT,
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"image too large ({e})", SKIP_HINT) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        reason = "not an image or corrupt" if "identify" in str(e) else f"cannot decode ({e})"
        raise BadImageError(path, reason, SKIP_HINT) from None
    if img.width == 0 or img.height == 0:
        raise BadImageError(path, "image has zero width or height", SKIP_HINT)
    return img


def _deep_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale to 8-bit L by scaling (Pillow's convert would clip)."""
    a = np.asarray(img)
    top = 65535.0 if a.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
    return Image.fromarray(
        np.clip(np.rint(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    )


def _normalise_mode(img: Image.Image, path: Path) -> Image.Image:
    """Bring any Pillow mode to L, LA, RGB or RGBA (transparency kept)."""
    mode = img.mode
    if mode.startswith("I"):
        return _deep_to_8bit(img)
    if mode == "F":
        raise BadImageError(path, "floating-point image", "save it as an 8- or 16-bit image")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode in ("La",):
        return img.convert("LA")
    if mode in ("RGBa", "RGBX"):
        return img.convert("RGBA" if mode == "RGBa" else "RGB")
    try:
        return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as e:
        raise BadImageError(path, f"unsupported image mode {mode} ({e})", SKIP_HINT) from None


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> NDArray[np.uint8]:
    """(H, W, 3) uint8 RGB. Transparent pixels keep their stored colour (alpha is dropped)."""
    path = Path(path)
    img = _normalise_mode(open_image(path, max_pixels), path)
    if img.mode in ("L", "LA"):
        a = np.asarray(img.convert("L"))
        return np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def read_rgba(path: str | Path, max_pixels: int = MAX_PIXELS) -> NDArray[np.uint8]:
    """(H, W, 4) uint8 RGBA of an image that has real transparency.

    Refuses images with no alpha channel, an alpha that is opaque everywhere, or one that is
    transparent everywhere: a cutout needs both car and background pixels.
    """
    path = Path(path)
    img = _normalise_mode(open_image(path, max_pixels), path)
    if img.mode not in ("LA", "RGBA"):
        raise BadImageError(
            path,
            f"foreground has no transparency (mode {img.mode})",
            "give an RGBA PNG cutout, make one with the foregrounds stage and a mask, "
            "or " + SKIP_HINT,
        )
    rgba = np.ascontiguousarray(np.asarray(img.convert("RGBA")))
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        raise BadImageError(
            path,
            "foreground alpha is opaque everywhere (no transparency)",
            "give a cutout whose background is transparent, or " + SKIP_HINT,
        )
    if alpha.max() < 128:
        raise BadImageError(path, "foreground is fully transparent (nothing to paste)", SKIP_HINT)
    return rgba


def parse_size(text: str) -> tuple[int, int]:
    """'224' or '320x224' (width x height) to (height, width)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums) <= 0:
        raise ValueError(f"size must be N or WIDTHxHEIGHT with positive integers, got {text!r}")
    w, h = (nums[0], nums[0]) if len(nums) == 1 else nums
    return h, w


def fit_crop(img: NDArray[np.uint8], height: int, width: int) -> NDArray[np.uint8]:
    """Resize keeping the aspect ratio so the image covers (height, width), then centre-crop."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def describe(paths: Iterable[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
