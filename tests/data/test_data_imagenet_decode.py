"""CPU decoding of ImageNet samples (fastpreact.data.imagenet_decode): torchvision.io for JPEG/PNG/WebP,
PIL for other formats and for files torchvision.io refuses; 3 channels whatever the file holds; damaged
files raise UnreadableImage with the reason; and the torchvision loader over such files."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastpreact.data import build_data
from fastpreact.data import imagenet_decode
from fastpreact.data.imagefolder import UnreadableImage
from fastpreact.data.imagenet_decode import decode_pil, decode_window

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

WINDOW, SIDE = (5, 3, 41, 37), 24


def _pixels(h=48, w=56):
    # A smooth colour image: resamplers and JPEG decoders agree on it to a few levels.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([100 + 60 * np.sin(xx / 9), 120 + 50 * np.cos(yy / 7), 90 + 40 * np.sin((xx + yy) / 11)], -1)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    rgb = Image.fromarray(_pixels())
    made = {
        "rgb.jpg": lambda p: rgb.save(p, quality=95),
        "gray.jpg": lambda p: rgb.convert("L").save(p, quality=95),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, quality=95),
        "rgb.png": lambda p: rgb.save(p),
        "gray.png": lambda p: rgb.convert("L").save(p),
        "palette.png": lambda p: rgb.convert("P").save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "rgb.webp": lambda p: rgb.save(p, lossless=True),
        "rgb.bmp": lambda p: rgb.save(p),
        "rgb.tiff": lambda p: rgb.save(p),
    }
    for name, save in made.items():
        save(str(d / name))
    raw = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    damaged = bytearray(raw)
    dht = damaged.find(b"\xff\xc4")
    damaged[dht + 5:dht + 40] = b"\xff" * 35  # a broken Huffman table: no decoder reads it
    (d / "damaged.jpg").write_bytes(bytes(damaged))
    (d / "garbage.bmp").write_bytes(b"BM" + b"\x00" * 40)
    return d


@pytest.mark.parametrize("name", ["rgb.jpg", "gray.jpg", "cmyk.jpg", "rgb.png", "gray.png", "palette.png",
                                  "rgba.png", "rgb.webp"])
@pytest.mark.parametrize("flip", [False, True])
def test_torchvision_formats_give_three_channels_like_pil(files, name, flip, monkeypatch):
    path = str(files / name)
    expect = decode_pil(path, WINDOW, flip, SIDE)
    pil_calls = []
    monkeypatch.setattr(imagenet_decode, "decode_pil", lambda *a: pil_calls.append(a))
    got = decode_window(path, WINDOW, flip, SIDE)
    assert not pil_calls  # torchvision.io decoded it
    assert got.shape == (SIDE, SIDE, 3) and got.dtype == torch.uint8
    diff = (got.int() - expect.int()).abs()
    # Same window, flip and bilinear antialiased resize: the resamplers round differently by a level or
    # two (six on a palette image's hard colour steps); a window one pixel off averages 1.1 to 3.2.
    assert diff.float().mean() < 0.5 and diff.max() <= 8, (name, diff.max())


def test_other_formats_fall_back_to_pil(files, monkeypatch):
    tv_calls = []
    real = imagenet_decode.decode_torchvision
    monkeypatch.setattr(imagenet_decode, "decode_torchvision", lambda *a: tv_calls.append(a) or real(*a))
    for name in ("rgb.bmp", "rgb.tiff"):
        path = str(files / name)
        got = decode_window(path, WINDOW, True, SIDE)
        assert torch.equal(got, decode_pil(path, WINDOW, True, SIDE)) and got.shape == (SIDE, SIDE, 3)
    assert not tv_calls
    # A file torchvision.io refuses is decoded by PIL, that file only.
    monkeypatch.setattr(imagenet_decode, "decode_torchvision",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("unsupported variant")))
    path = str(files / "rgb.jpg")
    assert torch.equal(decode_window(path, WINDOW, False, SIDE), decode_pil(path, WINDOW, False, SIDE))
    # Without torchvision's codecs every file goes through PIL.
    monkeypatch.setattr(imagenet_decode, "torchvision_codecs_available", lambda: False)
    assert torch.equal(decode_window(str(files / "rgb.png"), WINDOW, False, SIDE),
                       decode_pil(str(files / "rgb.png"), WINDOW, False, SIDE))


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "incomplete|truncated"),
                                         ("damaged.jpg", "Huffman"), ("garbage.bmp", "PIL|BMP|cannot"),
                                         ("missing.jpg", "cannot read it")])
def test_corrupt_files_raise_unreadable_with_the_reason(files, name, reason):
    with pytest.raises(UnreadableImage, match=reason) as caught:
        decode_window(str(files / name), WINDOW, False, SIDE)
    assert ".cpp" not in str(caught.value) and "\n" not in str(caught.value)


def test_torchvision_loader_reads_every_format_and_skips_a_damaged_file(files, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPREACT_CACHE", str(tmp_path / "cache"))
    names = ["rgb.jpg", "gray.jpg", "cmyk.jpg", "rgb.png", "gray.png", "palette.png", "rgba.png", "rgb.webp",
             "rgb.bmp", "rgb.tiff", "damaged.jpg"]
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            for name in names:
                (tmp_path / split / c / name).write_bytes((files / name).read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_data("imagenet", data_dir=str(tmp_path), batch_size=4, device="cpu",
                       loader="torchvision", workers=0, val_batch_size=8)
        planned = [p for i in range(len(b.train)) for p, *_ in b.train.plan.batch(0, i)]
        train = [(x, y) for x, y in b.train]
        val = [(x, y) for x, y in b.val]
    messages = [str(w.message) for w in caught]
    damaged = sorted(p for p in planned if p.endswith("damaged.jpg"))
    assert damaged and sorted(b.train.skipped) == damaged
    val_damaged = [os.path.join(str(tmp_path), "val", c, "damaged.jpg") for c in "ab"]
    assert sorted(b.val.skipped) == val_damaged
    for bad in damaged + val_damaged:
        assert any(bad in m and "undecodable" in m and "Huffman" in m for m in messages), bad
    # 22 training files make 5 batches of 4 (two sit the epoch out); a damaged file leaves its batch
    # one image short, the epoch still completes.
    assert len(train) == len(b.train) == 5 and len(planned) == 20
    assert sum(y.numel() for _, y in train) == 20 - len(damaged)
    assert sum(y.numel() for _, y in val) == 20 and len(b.val) == 3
    for x, _ in train + val:
        assert x.shape[1:] == (3, 224, 224) and torch.isfinite(x).all()
