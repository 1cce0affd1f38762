"""Decode one planned sample on the CPU: the file's crop window, resized to the output side (bilinear,
antialiased) and maybe mirrored, as uint8 [out, out, 3].

JPEG, PNG, WebP and GIF are decoded by torchvision.io (libjpeg-turbo and libpng on the raw bytes,
about twice as fast as PIL, and the uint8 resize is vectorised). Other formats (BMP, TIFF, PPM...) and
any file torchvision.io refuses go through PIL, that file only; every file does where torchvision
lacks its image codecs (0.29 deprecates them in favour of TorchCodec). Grayscale, palette, CMYK and
alpha images all come out as 3 channels (alpha dropped, as PIL's convert("RGB") does). EXIF
orientation is ignored by both decoders, as it is by DALI, so every loader sees the same pixels.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch

from .imagefolder import UnreadableImage

# File signatures torchvision.io.decode_image reads (it dispatches on them the same way).
_TORCHVISION_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def _is_torchvision_format(head: bytes) -> bool:
    return head.startswith(_TORCHVISION_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _first_line(exc: Exception) -> str:
    # torchvision's C++ errors start with "decode_jpeg, /path/to/decode_jpeg.cpp:171, ": keep the reason.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {re.sub(r'^.*?[.]cpp:[0-9]+, *', '', text)}"


@lru_cache(maxsize=None)
def torchvision_codecs_available() -> bool:
    try:
        from torchvision.io import ImageReadMode, decode_image  # noqa: F401
    except ImportError:
        return False
    return True


def decode_torchvision(data: np.ndarray, window, flip: bool, out_size: int) -> torch.Tensor:
    """uint8 [out,out,3] from encoded bytes with torchvision.io; raises what torchvision raises."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import InterpolationMode, resize
    image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)  # [3,H,W]
    if image.dtype != torch.uint8:  # 16-bit PNG: keep the top 8 bits, as an 8-bit encoder would
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    x, y, w, h = window
    crop = resize(image[:, y:y + h, x:x + w], [out_size, out_size], InterpolationMode.BILINEAR,
                  antialias=True)
    if flip:
        crop = crop.flip(-1)
    return crop.permute(1, 2, 0)


def decode_pil(path: str, window, flip: bool, out_size: int) -> torch.Tensor:
    """uint8 [out,out,3] with PIL; raises UnreadableImage naming the reason."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            x, y, w, h = window
            im = im.resize((out_size, out_size), Image.BILINEAR, box=(x, y, x + w, y + h))
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on damaged files
        raise UnreadableImage(_first_line(exc)) from None


def decode_window(path: str, window, flip: bool, out_size: int) -> torch.Tensor:
    """uint8 [out,out,3]: the window of the image resized, maybe mirrored (see the module docstring).
    Raises UnreadableImage naming the reason when neither decoder reads the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UnreadableImage(f"cannot read it ({exc.strerror or exc})") from None
    if not (_is_torchvision_format(data[:12].tobytes()) and torchvision_codecs_available()):
        return decode_pil(path, window, flip, out_size)
    try:
        return decode_torchvision(data, window, flip, out_size)
    except Exception as exc:  # a damaged file, or a variant libjpeg/libpng refuse: PIL decides
        reason = _first_line(exc)
    try:
        return decode_pil(path, window, flip, out_size)
    except UnreadableImage as pil_reason:
        raise UnreadableImage(f"{reason} (PIL: {pil_reason})") from None
