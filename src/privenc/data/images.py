"""Decoding image files and bringing them to the square working resolution.

Every file-backed source decodes through :func:`read_image`, and both the memmap cache and
uncached loading resize through :func:`resize_square`, so a cached image and one decoded on
the fly are the same bytes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from privenc.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""File name endings (lower-case) that folder sources treat as images; other files are ignored."""

# Errors Pillow raises for files it cannot decode: unidentified or truncated data (OSError and
# its subclass UnidentifiedImageError), corrupt headers (SyntaxError, ValueError, EOFError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)


def read_image(path: Path | str) -> np.ndarray:
    """Decode ``path`` as an RGB ``uint8`` array of shape (H, W, 3).

    Grayscale, palette, RGBA (alpha dropped) and CMYK images are converted to RGB, and EXIF
    orientation is applied so photos from phones stand upright. Any failure raises
    :class:`DataError` naming the file: missing, empty, not an image, truncated, or larger
    than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow only *warns* up to twice that limit; we refuse,
    because one decompression bomb can exhaust the memory of a data-loader worker).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                    image = ImageOps.exif_transpose(image)
                image.load()  # decode now, inside the error handling
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                array = np.asarray(rgb)
    except FileNotFoundError:
        raise DataError(f"image file missing: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: refused as a possible decompression bomb ({err}); raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if the image is genuine"
        ) from None
    except _DECODE_ERRORS as err:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes), not an image") from None
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    return array


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (antialiased), then center-crop to (size, size, 3).

    This is the fixed-scale view every later step starts from: the cache stores it, and the
    training / evaluation transforms crop from it (the paper's "fixed scale + center crop").
    """
    height, width = image.shape[:2]
    if height == size and width == size:
        return image
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    # Pillow's bilinear filter widens its support when shrinking, i.e. it is antialiased.
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))
