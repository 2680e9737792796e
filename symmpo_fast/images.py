"""Reading a data set's images as a hostile file would test it: confined paths, regular files only,
bounded pixels and shapes, every bit depth decoded to 8-bit RGB.

* **Confined paths.**  A path is resolved one component at a time under the image root (the
  data file's folder unless ``image_root`` says otherwise), symbolic links followed, and refused
  the moment a step would leave the root (``..`` at the root, an absolute path or link target
  outside it): nothing outside the root is ever looked at, so a path that leaves it gets the
  same words whatever exists out there.  The file opened is the resolved path, the one that
  was checked (its last component with ``O_NOFOLLOW``), never the path as written, which the
  kernel would resolve again (``/etc/passwd/..`` folds textually, not on disk).
  ``allow_outside_root`` lifts all this for data whose paths are absolute on purpose.
* **Regular files only.**  Every data file is opened with ``O_NONBLOCK`` and checked with
  ``fstat`` before one byte is read (:func:`open_regular`): a FIFO would otherwise block the
  reader forever, a device never end.
* **Bounded pixels.**  The size in the header is checked against ``max_pixels`` before decoding
  (an 11000x11000 1-bit PNG of 15 KB is 363 MB as RGB; PIL's open + convert peaks at 0.6 GB).
  JPEG is downscaled while decoding (the decoder's 1/2, 1/4, 1/8 scales,
  :meth:`PIL.Image.Image.draft`), so camera photos stay usable; any other format above the bound
  is refused, since it could only be shrunk after a full decode.  This bound replaces PIL's own
  (``Image.MAX_IMAGE_PIXELS``, which refuses above 178.9 Mpx at open, before a JPEG could be
  drafted): ``max_pixels`` means what it says in both directions.
* **Bounded shape.**  Width / height (or its inverse) above ``max_aspect_ratio`` (default 200) is
  refused from the header: processors resize the short side (LLaVA-1.5: to 336 px), so a 373-byte
  1x100000 PNG of 0.1 Mpx becomes 336 x 33.6 M pixels in the middle of a run; Qwen-VL's processor
  itself raises above 200.  Measured, LLaVA-1.5's processor (CLIP, 336 px) on a 1x200 image: +215 MB
  peak memory, on 1x2000: +2.2 GB (so ~100 GB for 1x100000).
* **Bit depth.**  16-bit greyscale PNGs (mode ``I;16``) are scaled to 8 bits; PIL's own
  ``convert("RGB")`` clips them, turning 99.6 % of a ramp's pixels white.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 25_000_000  # 5000 x 5000: 100 MB decoded as RGBA; a 48-Mpx JPEG photo decodes at 1/2 scale
MAX_ASPECT_RATIO = 200.0  # Qwen-VL's processors' own bound; see the module docstring for LLaVA's cost
_JPEG_SCALES = (2, 4, 8)
_MAX_LINKS = 40  # as Linux's MAXSYMLINKS: a loop of links fails instead of spinning
# PIL's bomb limit is a module global. Only an image PIL refuses (above 178.9 Mpx by default) is
# opened again with it lifted, our own header bound being checked instead, then it is restored;
# the lock keeps two of our threads from restoring it wrong.  Another thread's Image.open inside
# that rare window sees no PIL limit.
_PIL_LIMIT = threading.Lock()


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
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive int, got {self.max_pixels!r}")
        ratio = self.max_aspect_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1 <= ratio < float("inf"):
            raise ValueError(f"max_image_aspect_ratio must be a finite number >= 1, got {ratio!r}")


def _outside(field: str, text: str, base: Path) -> RecordProblem:
    return RecordProblem("image_outside_root", f"{field} path {text!r} leaves the image root {base}",
                         "move the image under the root, set --image-root to a folder that holds it, or pass "
                         "--allow-outside-image-root")


def _parts(path: str) -> list[str]:
    return [c for c in path.split(os.sep) if c not in ("", ".")]


def resolve(value: str | os.PathLike, field: str, root: Path | None, policy: ImagePolicy) -> str:
    """The file ``value`` names under ``root`` (the current directory when None), as a path with
    no symbolic link and no ``..`` left; refused when resolving it would leave the root."""
    text = os.fspath(value)
    if "\0" in text:
        raise RecordProblem("missing_image", f"{field} path {text!r} holds a NUL byte, which no file name can",
                            "fix the path")
    if not text.strip():
        raise RecordProblem("missing_image", f"{field} is an empty path", "give the image's path")
    base = Path(root) if root is not None else Path.cwd()
    if policy.allow_outside_root:
        return str(base / text)  # an absolute text replaces the base
    real_root = os.path.realpath(base)
    anchors = [_parts(real_root), _parts(os.path.abspath(base))]

    def below_root(absolute: str) -> list[str]:
        """The components of an absolute path after the root's, compared as written (no '..' folded)."""
        parts = _parts(absolute)
        for anchor in anchors:
            if parts[: len(anchor)] == anchor:
                return parts[len(anchor):]
        raise _outside(field, text, base)

    # The walk never looks at a path outside the root: a '..' at the root, or a link to outside,
    # is refused before anything past it is touched.
    todo = list(reversed(below_root(text) if os.path.isabs(text) else _parts(text)))
    here, links = real_root, 0
    while todo:
        name = todo.pop()
        if name == "..":
            if here == real_root:
                raise _outside(field, text, base)
            here = os.path.dirname(here)
            continue
        step = os.path.join(here, name)
        try:
            mode = os.lstat(step).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise RecordProblem("missing_image", f"{field} file {base / text} does not exist",
                                "fix the path or set --image-root") from None
        except OSError as e:
            raise RecordProblem("unreadable_image", f"{field} file {base / text} cannot be opened: {e.strerror}",
                                "make the file readable") from None
        if stat.S_ISLNK(mode):
            links += 1
            if links > _MAX_LINKS:
                raise RecordProblem("unreadable_image", f"{field} path {text!r} has more than {_MAX_LINKS} symbolic "
                                    "links (a loop?)", "point the record at the image file itself")
            target = os.readlink(step)
            if os.path.isabs(target):
                here, target_parts = real_root, below_root(target)
            else:
                target_parts = _parts(target)
            todo.extend(reversed(target_parts))
            continue
        here = step
    return here


def open_regular(path: str | os.PathLike, what: str, follow: bool = True):
    """``path`` opened for reading in binary; RecordProblem ``not_a_file`` when it is no regular file.

    Non-blocking and ``fstat``-checked before one byte is read: opening a FIFO for reading
    would wait for a writer forever.  ``follow=False`` refuses a symbolic link as the last
    component (a resolved path has none).  ``os.open``'s own errors (no such file, no
    permission) are raised as they are, for the caller to name."""
    nofollow = 0 if follow else getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | nofollow)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise RecordProblem("not_a_file", f"{what} {path} is not a regular file (a directory, FIFO or device)",
                            "point at a regular file")
    return os.fdopen(fd, "rb")


def _open_file(path: str, field: str, policy: "ImagePolicy"):
    try:
        return open_regular(path, field, follow=policy.allow_outside_root)
    except FileNotFoundError:
        raise RecordProblem("missing_image", f"{field} file {path} does not exist",
                            "fix the path or set --image-root") from None
    except OSError as e:
        raise RecordProblem("unreadable_image", f"{field} file {path} cannot be opened: {e.strerror}",
                            "make the file readable") from None


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


def _check_header(W: int, H: int, field: str, shown: str, policy: "ImagePolicy") -> None:
    """What the header alone says is too thin to decode (see the module docstring)."""
    if min(W, H) >= 1 and max(W, H) / min(W, H) > policy.max_aspect_ratio:
        raise RecordProblem("image_aspect_ratio", f"{field} {shown} is {W}x{H}, an aspect ratio of "
                            f"{max(W, H) / min(W, H):.0f}:1, above max_image_aspect_ratio={policy.max_aspect_ratio:g} "
                            "(a processor resizing its short side would blow it up)",
                            "crop or pad the image, or raise --max-image-aspect-ratio")


def _decode(fh, field: str, shown: str, policy: "ImagePolicy") -> Image.Image:
    max_pixels = policy.max_pixels
    with Image.open(fh) as im:
        W, H = im.size
        _check_header(W, H, field, shown, policy)
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
            raise RecordProblem("image_too_small", f"{field} {shown} is empty ({w}x{h})", "replace the image")
        return _to_rgb(im, f"{field} {shown}")


def open_image(source: bytes | str | Image.Image, field: str = "image", policy: ImagePolicy | None = None
               ) -> Image.Image:
    """Decode fully (a truncated file fails here, not in the middle of training) to 8-bit RGB.

    ``source``: a PIL image, encoded bytes, or a path already :func:`resolve`-d under ``policy``.
    """
    policy = policy or ImagePolicy()
    if isinstance(source, Image.Image):
        return _to_rgb(source, f"{field} (in memory)")
    shown = source if isinstance(source, str) else f"({len(source)} bytes)"
    fh = io.BytesIO(source) if isinstance(source, bytes) else _open_file(source, field, policy)
    with fh, warnings.catch_warnings():
        # Our header checks replace PIL's bomb check and its warning (see the module docstring).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            try:
                return _decode(fh, field, shown, policy)
            except Image.DecompressionBombError:
                fh.seek(0)  # regular files and bytes only: seekable
                with _PIL_LIMIT:
                    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        return _decode(fh, field, shown, policy)
                    finally:
                        Image.MAX_IMAGE_PIXELS = pil_limit
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, RecordProblem):
                raise
            raise RecordProblem("unreadable_image", f"{field} {shown} cannot be decoded as an image: {e}",
                                "replace the file with a readable image") from None


def pixels_digest(image: Image.Image) -> str:
    """Of the decoded pixels, so that the same picture hashes the same from a file, bytes or memory."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
