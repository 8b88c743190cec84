"""Reading and writing tiles (uint8 RGB at the boundary; see :mod:`shiftkit.core.image`). The readers live in
:mod:`shiftkit.core.files` (lower layers read images too) and are re-exported here."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from ..core.errors import InvalidArgumentError
from ..core.files import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageReadError,
    PathLike,
    default_max_pixels,
    icc_description,
    icc_to_srgb,
    icc_transform,
    image_header,
    image_size,
    ijg_luminance_table,
    jpeg_quality,
    list_images,
    read_icc,
    read_image,
)


def _embed_icc(data: bytes, icc: bytes, png: bool) -> bytes:
    """``data`` (a PNG or baseline JPEG file as OpenCV writes it) with the ICC profile ``icc`` embedded: a PNG ``iCCP``
    chunk after ``IHDR`` (PNG 1.2, 4.2.2.4), or JPEG ``APP2 ICC_PROFILE`` segments after ``SOI``/``APP0`` (ICC.1, B.4)."""
    import struct
    import zlib

    if png:
        body = b"ICC Profile\x00\x00" + zlib.compress(icc)  # keyword, NUL, compression method 0 (zlib)
        chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
        end = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4  # signature, IHDR
        return data[:end] + chunk + data[end:]
    pos = 2  # after SOI; JFIF's APP0 stays first
    if data[2:4] == b"\xff\xe0":
        pos = 4 + struct.unpack(">H", data[4:6])[0]
    parts = [icc[i:i + 65519] for i in range(0, len(icc), 65519)]
    segs = b"".join(b"\xff\xe2" + struct.pack(">H", 2 + 14 + len(c)) + b"ICC_PROFILE\x00" + bytes([i + 1, len(parts)]) + c
                    for i, c in enumerate(parts))
    return data[:pos] + segs + data[pos:]


def write_image(path: PathLike, image: np.ndarray, *, quality: int = 95, tmp_dir: Optional[PathLike] = None,
                icc: Optional[bytes] = None) -> None:
    """Write ``(H, W, 3)`` uint8 RGB atomically: a temporary file, then a rename over ``path``.

    ``icc``: an ICC colour profile to embed (PNG, JPEG, TIFF; other formats go without), e.g. the profile of the slide
    a tile was cut from, so that ``read_image(..., apply_icc=True)`` can still convert the tile to sRGB.

    The temporary file is ``.shiftkit-<random>.tmp`` in ``tmp_dir`` (default: the output's folder; it must be on the
    same file system). The file's mode honours the process umask, like any file a program creates (0644 under
    umask 0022, 0600 under 0077). Anything but an ``(H, W, 3)`` uint8 array raises :class:`InvalidArgumentError` naming
    ``path``, before any file is made.
    """
    p = Path(path)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidArgumentError(f"`image` for {p} is not an RGB tile: expected (H, W, 3) uint8, got {image.dtype} "
                                   f"{tuple(image.shape)}")
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = p.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if suffix in (".jpg", ".jpeg") else []
    if icc and suffix in (".tif", ".tiff"):
        import io as _io

        from PIL import Image

        out = _io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(out, format="TIFF", icc_profile=icc)
        data = out.getvalue()
    else:
        bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)  # the same bytes as image[..., ::-1], ~30x faster
        ok, buf = cv2.imencode(suffix if suffix in IMAGE_SUFFIXES else ".png", bgr, params)
        if not ok:
            raise OSError(f"`{p}` could not be encoded as {suffix}")
        data = buf.tobytes()
        if icc and suffix in (".png", ".jpg", ".jpeg"):  # OpenCV's encoding (4-5x faster than Pillow's) + the profile
            data = _embed_icc(data, icc, suffix == ".png")
    tmp_folder = Path(tmp_dir) if tmp_dir is not None else p.parent
    tmp_folder.mkdir(parents=True, exist_ok=True)
    tmp = str(tmp_folder / f".shiftkit-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
