"""Reading a data set's images as a hostile file would test it: confined paths, regular files only,
bounded pixels, every bit depth decoded to 8-bit RGB.

* **Confined paths.**  A relative path is resolved against the image root (the data file's
  folder unless ``image_root`` says otherwise); the resolved path, symbolic links followed, must
  stay inside the root, or the image is refused before anything is opened, with the same words
  whether or not such a file exists.  ``allow_outside_root`` lifts this for data whose paths
  are absolute on purpose.
* **Regular files only.**  The file is opened with ``O_NONBLOCK`` and checked with ``fstat``
  before one byte is read: a FIFO would otherwise block the reader forever, a device never end.
* **Bounded pixels.**  The size in the header is checked against ``max_pixels`` before decoding
  (an 11000x11000 1-bit PNG of 15 KB is 363 MB as RGB; PIL's open + convert peaks at 0.6 GB).
  JPEG is downscaled while decoding (the decoder's 1/2, 1/4, 1/8 scales,
  :meth:`PIL.Image.Image.draft`), so camera photos stay usable; any other format above the bound
  is refused, since it could only be shrunk after a full decode.
* **Bit depth.**  16-bit greyscale PNGs (mode ``I;16``) are scaled to 8 bits; PIL's own
  ``convert("RGB")`` clips them, turning 99.6 % of a ramp's pixels white.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 25_000_000  # 5000 x 5000: 100 MB decoded as RGBA; a 48-Mpx JPEG photo decodes at 1/2 scale
_JPEG_SCALES = (2, 4, 8)


class RecordProblem(ValueError):
    """Why a record cannot be trained on: ``kind`` (what skipped records are counted by), the
    problem, and ``fix``, what the user can do about it.  Raised by the readers and the checks
    (:mod:`symmpo_fast.formats` re-exports it)."""

    def __init__(self, kind: str, message: str, fix: str):
        super().__init__(message)
        self.kind, self.fix = kind, fix


@dataclass(frozen=True)
class ImagePolicy:
    """How a data set's images are found and decoded (see the module docstring)."""

    max_pixels: int = MAX_PIXELS
    allow_outside_root: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive int, got {self.max_pixels!r}")


def resolve(value: str | os.PathLike, field: str, root: Path | None, policy: ImagePolicy) -> str:
    """The path of ``value`` under ``root`` (the current directory when None), refused when it leaves it."""
    text = os.fspath(value)
    if not text.strip():
        raise RecordProblem("missing_image", f"{field} is an empty path", "give the image's path")
    base = Path(root) if root is not None else Path.cwd()
    path = base / text  # an absolute text replaces the base
    if not policy.allow_outside_root:
        real_root, real = os.path.realpath(base), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            # Said before the file is looked at: the message is the same whether or not it exists.
            raise RecordProblem("image_outside_root", f"{field} path {text!r} leaves the image root {base}",
                               "move the image under the root, set --image-root to a folder that holds it, or "
                               "pass --allow-outside-image-root")
    return str(path)


def _open_regular(path: str, field: str):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RecordProblem("missing_image", f"{field} file {path} does not exist",
                           "fix the path or set --image-root") from None
    except OSError as e:
        raise RecordProblem("unreadable_image", f"{field} file {path} cannot be opened: {e.strerror}",
                           "make the file readable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RecordProblem("not_a_file", f"{field} {path} is not a regular file (a directory, FIFO or device)",
                           "point the record at an image file")
    return os.fdopen(fd, "rb")


def _draft_jpeg(im: Image.Image, max_pixels: int) -> None:
    """Ask the JPEG decoder for the smallest of its scales that brings the image under ``max_pixels``."""
    W, H = im.size
    for d in _JPEG_SCALES:
        if -(-W // d) * -(-H // d) <= max_pixels or d == _JPEG_SCALES[-1]:
            im.draft("RGB", (max(1, W // d), max(1, H // d)))
            return


def _to_rgb(im: Image.Image, what: str) -> Image.Image:
    """8-bit RGB; high-bit-depth greyscale is scaled, not clipped.  ``what`` names the image in errors."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        top = int(a.max()) if a.size else 0
        if a.size and (a.min() < 0 or top > 65535):
            raise RecordProblem("unreadable_image", f"{what} has {im.mode} pixels outside 0..65535, which have no "
                                "8-bit range", "convert the image to 8-bit RGB")
        # 16-bit data: 65535 -> 255.  Mode I holding 8-bit values (some TIFFs) keeps them.
        scale = 257 if im.mode.startswith("I;16") or top > 255 else 1
        return Image.fromarray(((a + scale // 2) // scale).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise RecordProblem("unreadable_image", f"{what} has floating-point pixels (mode F), which have no "
                            "agreed 8-bit range", "convert the image to 8-bit RGB")
    return im.convert("RGB")


def open_image(source: bytes | str | Image.Image, field: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (a truncated file fails here, not in the middle of training) to 8-bit RGB.

    ``source``: a PIL image, encoded bytes, or a path already :func:`resolve`-d.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, f"{field} (in memory)")
    shown = source if isinstance(source, str) else f"({len(source)} bytes)"
    fh = io.BytesIO(source) if isinstance(source, bytes) else _open_regular(source, field)
    with fh, warnings.catch_warnings():
        # The header check below replaces PIL's warning for images above its own 89-Mpx threshold.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fh) as im:
                W, H = im.size
                if W * H > max_pixels and im.format == "JPEG":
                    _draft_jpeg(im, max_pixels)
                w, h = im.size
                if w * h > max_pixels:
                    raise RecordProblem(
                        "image_too_large", f"{field} {shown} is {W}x{H} = {W * H / 1e6:.1f} Mpx, above "
                        f"max_image_pixels={max_pixels} (only JPEG can be downscaled while decoding)",
                        "downscale the file, or raise --max-image-pixels")
                im.load()
                if min(im.size) < 1:
                    raise RecordProblem("image_too_small", f"{field} {shown} is empty ({w}x{h})",
                                       "replace the image")
                return _to_rgb(im, f"{field} {shown}")
        except Image.DecompressionBombError as e:  # PIL refuses above 2x its threshold already at open
            raise RecordProblem("image_too_large", f"{field} {shown}: {e}",
                               "downscale the file, or raise --max-image-pixels") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, RecordProblem):
                raise
            raise RecordProblem("unreadable_image", f"{field} {shown} cannot be decoded as an image: {e}",
                               "replace the file with a readable image") from None


def pixels_digest(image: Image.Image) -> str:
    """Of the decoded pixels, so that the same picture hashes the same from a file, bytes or memory."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
