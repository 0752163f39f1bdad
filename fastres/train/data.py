"""Data sets for ``python -m fastres.train``: images as float tensors (N, 3, H, W), labels as int64.

* ``digits``      scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): no download.
                  Resized to ``size`` x ``size``, grey repeated to 3 channels, fixed stratified split
                  (360 test images, split seed 0).
* ``cifar10``     the python pickle release: DIR/data_batch_1..5 and DIR/test_batch
                  (DIR may also be the folder holding ``cifar-10-batches-py``).
* ``imagefolder`` one folder per class: DIR/train/<class>/*.png and DIR/val/<class>/... (or test/);
                  a single DIR/<class>/... tree is split 80/20 with a fixed seed. Images are read
                  with PIL when a batch needs them, converted to RGB and resized.
* ``synthetic``   random images and labels, for speed runs (accuracy means nothing there).

Everything the user can get wrong (missing folder, malformed file) raises :class:`DataError`
with a message naming what was expected. Augmentation (random crop with padding, horizontal flip)
runs on whole batches on the training device: :func:`augment`.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("digits", "cifar10", "imagefolder", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# ImageNet's per-channel statistics, the usual normalisation for photographs.
PHOTO_MEAN, PHOTO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The data the user pointed at is missing or not in the expected format."""


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    size: int          # images are size x size
    pad: int           # random-crop padding for training (0: none)
    flip: bool         # random horizontal flips for training
    description: str


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _limit(ds: TensorDataset, n: Optional[int]) -> TensorDataset:
    if n is None or n >= len(ds):
        return ds
    return TensorDataset(*(t[:n] for t in ds.tensors))


def digits(size: int = 16, limit_train: Optional[int] = None) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0      # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=360, random_state=0, stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    mean, std = x[tr].mean().item(), x[tr].std().item()
    x = (x - mean) / std
    train = _limit(TensorDataset(x[tr], y[tr]), limit_train)
    return Data(train, TensorDataset(x[te], y[te]), 10, size, pad=max(1, size // 8), flip=False,
                description=f"digits ({len(train)} train / {len(te)} test, {size}x{size})")


def _unpickle(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch {path} is missing") from None
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' "
                        f"and b'labels'): {type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected b'data' of shape (N, 3072) and N labels, got data "
                        f"{data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data, labels


def cifar10(data_dir: Optional[str], limit_train: Optional[int] = None) -> Data:
    if not data_dir:
        raise DataError("--data cifar10 needs --data-dir DIR, the folder holding data_batch_1..5 and "
                        "test_batch (the python version of CIFAR-10)")
    root = data_dir
    if not os.path.isfile(os.path.join(root, "test_batch")) and os.path.isdir(
            os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(root):
        raise DataError(f"CIFAR-10 folder {data_dir} does not exist (expected a folder holding "
                        "data_batch_1..5 and test_batch)")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise DataError(f"CIFAR-10 folder {root} lacks {', '.join(missing)} (expected data_batch_1..5 "
                        "and test_batch, the python version of CIFAR-10)")

    def load(files: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        parts = [_unpickle(os.path.join(root, n)) for n in files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).view(-1, 3, 32, 32).float() / 255.0
        return x, torch.from_numpy(np.concatenate([p[1] for p in parts]))

    xtr, ytr = load(names[:5])
    xte, yte = load(names[5:])
    if len(ytr) < 2 or len(yte) < 1:
        raise DataError(f"CIFAR-10 folder {root} holds {len(ytr)} training and {len(yte)} test images")
    mean = xtr.mean(dim=(0, 2, 3)).tolist()
    std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    train = _limit(TensorDataset(_normalise(xtr, mean, std), ytr), limit_train)
    return Data(train, TensorDataset(_normalise(xte, mean, std), yte), 10, 32, pad=4, flip=True,
                description=f"CIFAR-10 from {root} ({len(train)} train / {len(yte)} test)")


class ImageFiles(Dataset):
    """(path, label) pairs read with PIL on access: RGB, resized to size x size, normalised."""

    def __init__(self, samples: List[Tuple[str, int]], size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        x = torch.from_numpy(a).permute(2, 0, 1)
        return _normalise(x.unsqueeze(0), PHOTO_MEAN, PHOTO_STD)[0], label


def _class_tree(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, samples


def imagefolder(data_dir: Optional[str], size: int, limit_train: Optional[int] = None) -> Data:
    expected = ("an ImageFolder tree: DIR/train/<class>/<image> and DIR/val/<class>/<image> (or test/), "
                "or DIR/<class>/<image> to be split 80/20")
    if not data_dir:
        raise DataError(f"--data imagefolder needs --data-dir DIR, {expected}")
    if not os.path.isdir(data_dir):
        raise DataError(f"image folder {data_dir} does not exist (expected {expected})")
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, d) for d in ("val", "test")
                     if os.path.isdir(os.path.join(data_dir, d))), None)
    if os.path.isdir(train_dir):
        if test_dir is None:
            raise DataError(f"{data_dir} has train/ but no val/ or test/ folder (expected {expected})")
        classes, train = _class_tree(train_dir)
        test_classes, test = _class_tree(test_dir)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"{test_dir} has classes missing from {train_dir}: {', '.join(unknown[:5])}")
        remap = {i: classes.index(c) for i, c in enumerate(test_classes)}
        test = [(p, remap[label]) for p, label in test]
    else:
        classes, samples = _class_tree(data_dir)
        order = np.random.default_rng(0).permutation(len(samples))
        n_test = max(1, len(samples) // 5)
        test = [samples[i] for i in order[:n_test]]
        train = [samples[i] for i in order[n_test:]]
    if len(classes) < 2:
        raise DataError(f"{data_dir}: found {len(classes)} class folder(s); expected at least 2 ({expected})")
    if len(train) < 2 or not test:
        raise DataError(f"{data_dir}: found {len(train)} training and {len(test)} test images with "
                        f"extensions {', '.join(IMAGE_EXTENSIONS)} (expected {expected})")
    if limit_train is not None:
        train = [train[i] for i in np.random.default_rng(0).permutation(len(train))[:limit_train]]
    return Data(ImageFiles(train, size), ImageFiles(test, size), len(classes), size,
                pad=max(1, size // 8), flip=True,
                description=f"ImageFolder {data_dir} ({len(classes)} classes, {len(train)} train / "
                            f"{len(test)} test, {size}x{size})")


def synthetic(size: int = 32, limit_train: Optional[int] = None, num_classes: int = 10) -> Data:
    g = torch.Generator().manual_seed(0)
    n = limit_train or 1024

    def make(k):
        return TensorDataset(torch.randn(k, 3, size, size, generator=g),
                             torch.randint(0, num_classes, (k,), generator=g))

    return Data(make(n), make(max(2, n // 4)), num_classes, size, pad=0, flip=False,
                description=f"synthetic random images ({n} train, {size}x{size}; accuracy is meaningless)")


def load(name: str, data_dir: Optional[str] = None, size: Optional[int] = None,
         limit_train: Optional[int] = None) -> Data:
    """The data set `name` (one of :data:`DATASETS`); `size` None takes the data set's own default."""
    if name == "digits":
        return digits(size or 16, limit_train)
    if name == "cifar10":
        if size not in (None, 32):
            raise DataError(f"CIFAR-10 images are 32x32; --image-size {size} is not supported for it")
        return cifar10(data_dir, limit_train)
    if name == "imagefolder":
        return imagefolder(data_dir, size or 224, limit_train)
    if name == "synthetic":
        return synthetic(size or 32, limit_train)
    raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")


def augment(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random crops of x padded by `pad` zeros, and random horizontal flips, per image (torch's RNG)."""
    n, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
        rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
        cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
        x = xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        m = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(m, x.flip(3), x)
    return x.contiguous()
