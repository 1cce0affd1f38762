"""CIFAR-10/100 from the standard python archives, held on the device as uint8 NHWC.

Accepted under the data directory (first match wins):
  cifar-10-batches-py/{data_batch_1..5,test_batch}   cifar-100-python/{train,test}   (extracted)
  cifar-10-python.tar.gz                             cifar-100-python.tar.gz         (as downloaded)
The data directory may also be the extracted folder itself. --download fetches the archive with
torchvision's downloader (needs a network).
"""
from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np

from .common import DataError

# Per-channel mean/std on the 0..255 scale, as in fb.resnet.torch (the paper's reference code).
CIFAR_STATS = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}

_LAYOUT = {
    # name: (folder, tarball, train members, val member, label key)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], b"fine_labels"),
}


def _decode_batch(raw: bytes, what: str, label_key: bytes):
    try:
        entry = pickle.loads(raw, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as exc:  # pickle raises many types on a damaged file
        raise DataError(f"CIFAR archive member {what} is corrupt ({type(exc).__name__}: {exc}); "
                        f"delete it and download the data set again (--download)") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape[0] != data.shape[0]:
        raise DataError(f"CIFAR archive member {what} has data of shape {data.shape} and "
                        f"{labels.shape[0]} labels, expected [N, 3072] and N; download it again")
    # Rows are 1024 R, 1024 G, 1024 B values (CHW planes): to NHWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _find(data_dir: str, dataset: str):
    folder, tarball, *_ = _LAYOUT[dataset]
    for candidate in (os.path.join(data_dir, folder), data_dir):
        if all(os.path.isfile(os.path.join(candidate, m)) for m in _LAYOUT[dataset][2] + _LAYOUT[dataset][3]):
            return "dir", candidate
    if os.path.isfile(os.path.join(data_dir, tarball)):
        return "tar", os.path.join(data_dir, tarball)
    return None, None


def _download(data_dir: str, dataset: str):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        os.makedirs(data_dir, exist_ok=True)
        cls(root=data_dir, train=True, download=True)
    except Exception as exc:
        raise DataError(f"could not download {dataset} into {data_dir} ({type(exc).__name__}: {exc}); "
                        f"without a network, copy {_LAYOUT[dataset][1]} there by hand") from None


def load_cifar(dataset: str, data_dir: str | None, download: bool = False):
    """Return (train_images, train_labels, val_images, val_labels) as numpy uint8 NHWC / int64."""
    folder, tarball, train_members, val_members, label_key = _LAYOUT[dataset]
    if data_dir is None:
        raise DataError(f"{dataset} needs a data directory: pass --data-dir DIR holding {folder}/ or "
                        f"{tarball} (add --download to fetch it)")
    data_dir = os.path.expanduser(data_dir)
    kind, where = _find(data_dir, dataset)
    if kind is None and download:
        _download(data_dir, dataset)
        kind, where = _find(data_dir, dataset)
    if kind is None:
        if not os.path.isdir(data_dir):
            problem = f"data directory {data_dir} does not exist"
        else:
            problem = f"{data_dir} holds neither {folder}/ (complete) nor {tarball}"
        raise DataError(f"{problem}; put the {dataset} python archive there or add --download")

    members = {}
    if kind == "dir":
        for m in train_members + val_members:
            with open(os.path.join(where, m), "rb") as f:
                members[m] = f.read()
    else:
        try:
            with tarfile.open(where, "r:gz") as tar:
                for m in train_members + val_members:
                    f = tar.extractfile(f"{folder}/{m}")
                    if f is None:
                        raise KeyError(m)
                    members[m] = f.read()
        except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
            raise DataError(f"{where} is not a complete {dataset} archive ({type(exc).__name__}: {exc}); "
                            f"delete it and download it again (--download)") from None

    def stack(names):
        parts = [_decode_batch(members[m], f"{where}:{m}", label_key) for m in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = stack(train_members)
    val_x, val_y = stack(val_members)
    num_classes = 10 if dataset == "cifar10" else 100
    for labels, split in ((train_y, "train"), (val_y, "test")):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{dataset} {split} labels fall outside [0, {num_classes}) in {where}; "
                            f"is this the other CIFAR? download it again")
    return train_x, train_y, val_x, val_y

