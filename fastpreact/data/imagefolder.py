"""ImageFolder layout (train/<class>/*, val/<class>/*) shared by the DALI and torchvision loaders:
layout validation, a cheap pre-scan of every file, and the geometry of every crop.

Pre-scan: for each file, read the header (to learn its width and height) and the last KiB. A JPEG must
start with SOI (FF D8), have a frame header (SOF) and end with EOI (FF D9) in its last KiB; a PNG must
have its IHDR and IEND chunks; other formats must open with PIL. A file that fails is skipped with a
warning naming it, before any loader sees it. Files that pass the scan and still fail to decode are
handled by the loaders (see imagenet.py).

Crop geometry: every sample, in training and validation, is a window (x, y, w, h) in source pixels,
resized to the output side, maybe mirrored. Both loaders draw the windows here, from the same seeds, so
DALI and torchvision see the same crops; only the decoders' and resizers' arithmetic differs.
"""
from __future__ import annotations

import math
import os
import random
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

from .common import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_TAIL = 1024


class UnreadableImage(Exception):
    """Why a file cannot be used (its message goes into the skip warning)."""


def list_classes(root: str, split: str):
    """Sorted class folders of root/split and, per class, the sorted image files in it."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir} is missing: ImageNet needs {root}/train/<class>/*.JPEG and "
                        f"{root}/val/<class>/*.JPEG (val sorted into class folders)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.JPEG "
                        f"(sort the flat val images into class folders first)")
    files = {}
    for c in classes:
        names = sorted(e.name for e in os.scandir(os.path.join(split_dir, c))
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not names:
            raise DataError(f"class folder {os.path.join(split_dir, c)} holds no images "
                            f"({', '.join(IMG_EXTENSIONS)}); remove it or fill it")
        files[c] = [os.path.join(split_dir, c, n) for n in names]
    return classes, files


def validate_layout(root):
    """Classes and {split: [(path, label)]} of an ImageFolder tree, or one DataError naming the problem."""
    if root is None:
        raise DataError("imagenet needs a data directory: pass --data-dir DIR holding train/ and val/")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError(f"data directory {root} does not exist; pass --data-dir DIR holding train/ and val/")
    for split in ("train", "val"):  # both missing-folder errors before any content error
        if not os.path.isdir(os.path.join(root, split)):
            list_classes(root, split)
    train_classes, train_files = list_classes(root, "train")
    val_classes, val_files = list_classes(root, "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"train/ and val/ of {root} hold different classes (only in train: "
                        f"{only_train[:5]}{'...' if len(only_train) > 5 else ''}; only in val: "
                        f"{only_val[:5]}{'...' if len(only_val) > 5 else ''}); make the folder sets equal")
    index = {c: i for i, c in enumerate(train_classes)}
    samples = {split: [(p, index[c]) for c in classes for p in files[c]]
               for split, classes, files in (("train", train_classes, train_files),
                                             ("val", val_classes, val_files))}
    return train_classes, samples


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, checking the end markers; raises UnreadableImage."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if head[:2] == b"\xff\xd8":
                wh = _jpeg_frame_size(f)
                f.seek(max(0, size - _TAIL))
                if b"\xff\xd9" not in f.read(_TAIL):
                    raise UnreadableImage("JPEG without its end marker (truncated?)")
                return wh
            if head == b"\x89PNG\r\n\x1a\n":
                ihdr = f.read(16)
                if len(ihdr) < 16 or ihdr[4:8] != b"IHDR":
                    raise UnreadableImage("PNG without an IHDR chunk")
                f.seek(max(0, size - 12))
                if b"IEND" not in f.read(12):
                    raise UnreadableImage("PNG without its IEND chunk (truncated?)")
                return struct.unpack(">II", ihdr[8:16])
    except OSError as exc:
        raise UnreadableImage(f"cannot read it ({exc.strerror or exc})") from None
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise UnreadableImage(f"not an image PIL can open ({type(exc).__name__})") from None


def _jpeg_frame_size(f) -> tuple[int, int]:
    # Walk the marker segments after SOI (each FF xx + 2-byte length) to the frame header.
    f.seek(2)
    while True:
        b = f.read(1)
        if not b:
            raise UnreadableImage("JPEG ends before its frame header (truncated?)")
        if b != b"\xff":
            raise UnreadableImage("JPEG with a damaged header (bytes between markers)")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise UnreadableImage("JPEG ends before its frame header (truncated?)")
        m = marker[0]
        if m == 0x01 or 0xD0 <= m <= 0xD8:
            continue  # markers without a length
        if m in (0xD9, 0xDA):
            raise UnreadableImage("JPEG without a frame header (SOF)")
        raw = f.read(2)
        if len(raw) < 2:
            raise UnreadableImage("JPEG ends inside a header segment (truncated?)")
        length = struct.unpack(">H", raw)[0]
        if m in _SOF:
            body = f.read(5)
            if len(body) < 5:
                raise UnreadableImage("JPEG ends inside its frame header (truncated?)")
            height, width = struct.unpack(">HH", body[1:5])
            if width == 0 or height == 0:
                raise UnreadableImage(f"JPEG frame header gives size {width}x{height}")
            return width, height
        if length < 2:
            raise UnreadableImage("JPEG with a damaged header segment length")
        f.seek(length - 2, os.SEEK_CUR)


def _cache_file(split_dir: str) -> str:
    import hashlib
    base = os.environ.get("FASTPREACT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastpreact")
    key = hashlib.sha1(os.path.realpath(split_dir).encode()).hexdigest()[:16]
    return os.path.join(base, f"imagefolder-scan-{key}.pkl")


def _load_cache(path):
    import pickle
    try:
        with open(path, "rb") as f:
            cache = pickle.load(f)
        return cache if isinstance(cache, dict) else {}
    except Exception:  # missing, unreadable or from another version: rescan
        return {}


def _save_cache(path, cache):
    import pickle
    import tempfile
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(cache, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
    except OSError:
        pass  # a read-only home only costs a rescan next time


def prescan(samples, workers: int = 8, what: str = "images", use_cache: bool | None = None):
    """Split [(path, label)] into usable [(path, label, width, height)] and skipped [(path, reason)].

    Each skipped file is warned about by name. The scan runs on threads (it is I/O bound) and its
    results are cached per class folder under ~/.cache/fastpreact (or $FASTPREACT_CACHE), reused while
    the folder's modification time is unchanged (files added, removed or renamed invalidate it; a file
    rewritten in place does not: decode failures are still caught by the loaders).
    FASTPREACT_SCAN_CACHE=0 turns the cache off.
    """
    if use_cache is None:
        use_cache = os.environ.get("FASTPREACT_SCAN_CACHE", "1") != "0"
    results = [None] * len(samples)
    cache, cache_path, dir_mtime = {}, None, {}
    if use_cache and samples:
        cache_path = _cache_file(os.path.dirname(os.path.dirname(samples[0][0])))
        cache = _load_cache(cache_path)
        for i, (path, _) in enumerate(samples):
            folder, name = os.path.split(path)
            if folder not in dir_mtime:
                try:
                    dir_mtime[folder] = os.stat(folder).st_mtime_ns
                except OSError:
                    dir_mtime[folder] = None
            entry = cache.get(folder)
            if entry is not None and entry[0] == dir_mtime[folder]:
                results[i] = entry[1].get(name)

    def scan(path):
        try:
            return image_size(path)
        except UnreadableImage as exc:
            return str(exc)

    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, r in zip(todo, pool.map(scan, [samples[i][0] for i in todo], chunksize=256)):
                results[i] = r
        if cache_path is not None:
            for (path, _), r in zip(samples, results):
                folder, name = os.path.split(path)
                entry = cache.get(folder)
                if entry is None or entry[0] != dir_mtime[folder]:
                    entry = cache[folder] = (dir_mtime[folder], {})
                entry[1][name] = r
            _save_cache(cache_path, cache)
    good, skipped = [], []
    for (path, label), r in zip(samples, results):
        if isinstance(r, str):
            skipped.append((path, r))
            warnings.warn(f"skipping unreadable image {path}: {r}", stacklevel=3)
        else:
            good.append((path, label, int(r[0]), int(r[1])))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(samples)} {what} as unreadable", stacklevel=3)
    return good, skipped


# ---- crop geometry -------------------------------------------------------------------------------

def inception_window(rng: random.Random, width: int, height: int, scale=(0.08, 1.0),
                     ratio=(3 / 4, 4 / 3)):
    """Random-resized-crop window (torchvision's RandomResizedCrop.get_params, with rng)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def scale_window(rng: random.Random, width: int, height: int, out: int = 224, shorter=(256, 480)):
    """The paper's scale augmentation as a source window: resize the shorter side to s ~ U{256..480},
    take a random out x out crop; i.e. a square of side out * short / s at a random place."""
    s = rng.randint(*shorter)
    k = min(width, height) / s                        # source pixels per resized pixel
    rw, rh = int(round(width / k)), int(round(height / k))  # resized image size
    i, j = rng.randint(0, max(0, rh - out)), rng.randint(0, max(0, rw - out))
    side = max(1, min(int(round(out * k)), width, height))
    x = min(int(round(j * k)), width - side)
    y = min(int(round(i * k)), height - side)
    return x, y, side, side


def val_resize(crop: int) -> int:
    """Shorter side before the centre crop: 256 for 224 (the standard 0.875 ratio); the paper's 320
    test resizes the shorter side to 320 and takes the 320 centre square."""
    return crop if crop >= 320 else int(round(crop * 256 / 224))


def centre_window(width: int, height: int, crop: int):
    """Resize shorter side to val_resize(crop), centre crop x crop, as a source window."""
    k = min(width, height) / val_resize(crop)
    side = max(1, min(int(round(crop * k)), width, height))
    return (width - side) // 2, (height - side) // 2, side, side


def train_sample_params(rng: random.Random, width: int, height: int, aug: str, out: int):
    """(window, flip) of one training sample."""
    if aug == "inception":
        window = inception_window(rng, width, height)
    else:
        window = scale_window(rng, width, height, out)
    return window, rng.random() < 0.5
