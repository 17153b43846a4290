"""Cheap image-file validation, run in parallel over a catalog's images.

Each check returns ``None`` for a usable image or a reason ``"<kind>: <path> (<detail>)"`` whose kind is one
of the constants below, so callers can count reasons by kind. Truncation is caught by a real decode
(``load()``), which relies on PIL's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.
"""
from __future__ import annotations

import math
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from bakeoff.common.workers import pool_context

MISSING = "image file missing"
EMPTY = "zero-byte image file"
UNDECODABLE = "undecodable image"
TRUNCATED = "truncated image"


def check_image(path: str | os.PathLike, decode: bool = True) -> str | None:
    """Why the image at ``path`` is unusable, or ``None``; ``decode=False`` only checks the file exists and is non-empty."""
    try:
        st = os.stat(path)
    except OSError:
        return f"{MISSING}: {path}"
    if not stat.S_ISREG(st.st_mode):
        return f"{MISSING}: {path} (not a regular file)"
    if st.st_size == 0:
        return f"{EMPTY}: {path}"
    if not decode:
        return None
    try:
        _decode(path)
    except UnidentifiedImageError:
        return f"{UNDECODABLE}: {path} (not an image format PIL can identify)"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on damaged files
        kind = TRUNCATED if "truncated" in str(e).lower() else UNDECODABLE
        return f"{kind}: {path} ({type(e).__name__}: {e})"
    return None


def _decode(path: str | os.PathLike) -> None:
    """Decode the image, raising on damage: JPEGs at 1/8 scale (every byte is still read, the IDCT is cheap);
    other formats are verified first (chunk structure and checksums: a PNG cut after its pixel data)."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, (1, 1))
            im.load()
            return
        im.verify()
    with Image.open(path) as im:
        im.load()


def check_images(
    paths: Sequence[str], decode: bool = True, workers: int | None = None, progress: bool = False
) -> list[str | None]:
    """``check_image`` over ``paths`` (in order) using ``workers`` processes (default: all CPUs), with a
    progress bar when ``progress``."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths)))
    bar = {"total": len(paths), "unit": "img", "desc": "verify images" if decode else "check images",
           "disable": not progress}
    if workers == 1:
        return [check_image(p, decode) for p in tqdm(paths, **bar)]
    chunk = min(math.ceil(len(paths) / (workers * 8)), 512)  # at most 512 images between progress updates
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
        return list(tqdm(pool.map(check_image, paths, [decode] * len(paths), chunksize=chunk), **bar))
