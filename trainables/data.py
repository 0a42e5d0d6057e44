"""Datasets as whole uint8 tensors, and batched augmentation on the device.

Every dataset here fits in memory (the largest, SVHN, is about 0.2 GB as uint8), so a trial
loads it once with :func:`load_dataset`, moves it to the device with :meth:`ImageData.to` and
slices batches there; :func:`augment` then crops and flips a whole batch without a Python
loop, so no DataLoader workers are needed. Pixels stay uint8 (0..255) until the engine divides
by 255, which keeps the device copy four times smaller than float32.

Loaders read the datasets' own on-disk formats (torchvision's where it has one) and never
download unless ``dataset.download`` is true; missing files raise :class:`DataNotFoundError`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from analysis.errors import DataNotFoundError, SpecError, unknown_choice
from trainables.config import NPZ_VAL_FRACTION, DatasetConfig

# Debian's `fashion-mnist` package: the four original gzipped idx files, used when the
# torchvision layout is absent and downloading is off.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

DIGITS_TEST_SIZE = 397  # sklearn's digits has 1797 images; 1400 train, 397 test
NPZ_TEST_FRACTION = 0.2  # held out as test when an .npz has no test arrays

# Independent random streams derived from `dataset.seed`, so that changing `train_size` does
# not change which labels are noised and neither correlates with the digits/npz split or with
# which training images are held out for validation.
_SUBSET_STREAM = 1
_NOISE_STREAM = 2
_VAL_STREAM = 3


@dataclass(frozen=True)
class ImageData:
    """A whole dataset as uint8 tensors, NCHW, values 0..255 (so it can sit on the device cheaply)."""

    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, C, H, W)
    test_y: torch.Tensor  # int64 (M,)
    num_classes: int
    crop_pad: int  # resolved augmentation: zero-padding for random crop (0 = none)
    flip: bool  # resolved augmentation: random horizontal flip
    # the validation split, held out of the training set by :func:`load_dataset` (empty before)
    val_x: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))  # uint8 (V, C, H, W)
    val_y: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # int64 (V,), true labels
    val_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # positions in the dataset's training split

    def to(self, device: torch.device) -> ImageData:
        """The same dataset with its image and label tensors on `device`."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
            val_x=self.val_x.to(device),
            val_y=self.val_y.to(device),
        )


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) as float in [0, 1], channels_last (oneDNN's and cuDNN's faster layout)."""
    return x_u8.float().div_(255.0).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- augmentation


def augment(
    x: torch.Tensor, *, crop_pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Batched augmentation on whatever device x is on (uint8 or float NCHW): random crop with
    `crop_pad` zero padding (each sample its own offset) and random horizontal flip (each sample
    with p=0.5). No Python loop over samples. Returns same dtype/shape. crop_pad=0 and flip=False -> x unchanged.

    Random numbers are drawn on `generator`'s device (or x's when there is none), so a CPU
    generator gives the same draws whichever device x is on.
    """
    if crop_pad < 0:
        raise ValueError(f"crop_pad must be non-negative, got {crop_pad}")
    if x.ndim != 4:
        raise ValueError(f"augment expects an NCHW batch, got shape {tuple(x.shape)}")
    if crop_pad == 0 and not flip:
        return x
    n, c, h, w = x.shape
    rng_device = generator.device if generator is not None else x.device
    out = x
    if crop_pad > 0:
        p = crop_pad
        padded = F.pad(x, (p, p, p, p))  # zeros around every image
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=rng_device).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=rng_device).to(x.device)
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H): source row of each row
        cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W): source column
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
        out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if flip:
        mask = torch.rand(n, generator=generator, device=rng_device).to(x.device) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


# ----------------------------------------------------------------------------- loading


def load_dataset(cfg: DatasetConfig) -> ImageData:
    """Load `cfg.name` on the CPU, hold out the validation split, then subsample, noise labels
    and resolve augmentation.

    The validation images are drawn first from the dataset's whole training split, so that
    `train_size` and `label_noise` never change them (and they keep their true labels); the
    subsample is then drawn from the rest. All of it is seeded by `cfg.seed` alone, so every
    method in a study sees the same images and the same corrupted labels.
    """
    if cfg.name not in LOADERS:
        raise unknown_choice("dataset.name", cfg.name, LOADERS)
    if cfg.seed < 0:
        raise SpecError("dataset.seed", f"must be non-negative (numpy seeds are); got {cfg.seed}")
    if not 0 <= cfg.label_noise < 1:
        raise SpecError("dataset.label_noise", f"must be in [0, 1); got {cfg.label_noise!r}")
    data = LOADERS[cfg.name](cfg)
    n = len(data.train_y)
    val_size = max(1, round(NPZ_VAL_FRACTION * n)) if cfg.val_size is None else cfg.val_size
    if not 1 <= val_size <= n - 2:
        raise SpecError(
            "dataset.val_size",
            f"holds out {val_size} of the {n} training images of `{cfg.name}`, leaving fewer than 2 to train on; "
            f"choose 1..{max(1, n - 2)}",
        )
    order = np.random.default_rng((cfg.seed, _VAL_STREAM)).permutation(n)
    val_index = torch.from_numpy(np.sort(order[:val_size]))
    rest = torch.from_numpy(np.sort(order[val_size:]))
    train_x, train_y = data.train_x[rest], data.train_y[rest]
    if cfg.train_size is not None:
        left = len(train_y)
        if not 1 <= cfg.train_size <= left:
            raise SpecError(
                "dataset.train_size",
                f"asks for {cfg.train_size} training images but `{cfg.name}` has {left} once {val_size} are held out "
                f"for validation (dataset.val_size); choose 1..{left} or null for all",
            )
        rng = np.random.default_rng((cfg.seed, _SUBSET_STREAM))
        keep = torch.from_numpy(np.sort(rng.choice(left, size=cfg.train_size, replace=False)))
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.label_noise > 0:
        train_y = noisy_labels(train_y, fraction=cfg.label_noise, num_classes=data.num_classes, seed=cfg.seed)
    test_x, val_x = data.test_x, data.train_x[val_index]
    if cfg.pool > 1:
        size = train_x.shape[-1]
        if size % cfg.pool:
            raise SpecError("dataset.pool", f"must divide the image size {size} of `{cfg.name}`; got {cfg.pool}")
        train_x, test_x, val_x = _avg_pool(train_x, cfg.pool), _avg_pool(test_x, cfg.pool), _avg_pool(val_x, cfg.pool)
    return dataclasses.replace(
        data,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        val_x=val_x,
        val_y=data.train_y[val_index],
        val_index=val_index,
        crop_pad=data.crop_pad if cfg.crop_pad is None else cfg.crop_pad,
        flip=data.flip if cfg.flip is None else cfg.flip,
    )


def _avg_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool uint8 images by `factor`, rounding back to uint8 (e.g. 28x28 -> 14x14)."""
    pooled = torch.nn.functional.avg_pool2d(x.float(), factor)
    return pooled.round().clamp(0, 255).to(torch.uint8)


def noisy_labels(y: torch.Tensor, *, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of `y` with round(fraction * N) labels, chosen at random, set to another class.

    The new class is uniform over the num_classes - 1 others (symmetric noise), so exactly
    that many labels change.
    """
    if num_classes < 2:
        raise SpecError("dataset.label_noise", f"needs at least 2 classes; the dataset has {num_classes}")
    rng = np.random.default_rng((seed, _NOISE_STREAM))
    n = len(y)
    count = round(fraction * n)
    idx = rng.choice(n, size=count, replace=False)
    shift = rng.integers(1, num_classes, size=count)  # 1..C-1: never back to the same class
    out = y.clone()
    out[idx] = (y[idx] + torch.from_numpy(shift)) % num_classes
    return out


def _image_data(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    *,
    num_classes: int,
    crop_pad: int,
    flip: bool,
) -> ImageData:
    """Pack arrays as contiguous uint8/int64 CPU tensors with the dataset's default augmentation."""
    return ImageData(
        train_x=torch.as_tensor(train_x, dtype=torch.uint8).contiguous(),
        train_y=torch.as_tensor(train_y, dtype=torch.int64).contiguous(),
        test_x=torch.as_tensor(test_x, dtype=torch.uint8).contiguous(),
        test_y=torch.as_tensor(test_y, dtype=torch.int64).contiguous(),
        num_classes=num_classes,
        crop_pad=crop_pad,
        flip=flip,
    )


def _root(cfg: DatasetConfig) -> Path:
    return Path(os.path.expanduser(cfg.root))


def _require(name: str, root: Path, folder: Path, files: list[str]) -> None:
    """Raise DataNotFoundError naming the missing ones of `files` (relative to `folder`)."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        prefix = folder.relative_to(root).as_posix() + "/" if folder != root else ""
        raise DataNotFoundError(
            name,
            str(root),
            expected=f"{', '.join(prefix + f for f in files)}; missing: {', '.join(missing)}",
        )


# --- digits


def load_digits(cfg: DatasetConfig) -> ImageData:
    """sklearn's bundled 8x8 digits (no download), split 1400/397 by `cfg.seed`."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(cfg.seed).permutation(len(y))
    test, train = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    # Digits are not flip-symmetric and 8 pixels leave no room for a crop.
    return _image_data(x[train], y[train], x[test], y[test], num_classes=10, crop_pad=0, flip=False)


# --- Fashion-MNIST

_IDX_UINT8 = 0x08
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: magic 0,0,type,ndim; big-endian int32 dims; data.

    Only the unsigned-byte type (0x08) is accepted: it is the only one the MNIST family uses.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SpecError("dataset.root", f"{path} is not an idx file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype != _IDX_UINT8:
        raise SpecError("dataset.root", f"{path}: idx data type 0x{dtype:02x}; expected 0x08 (unsigned byte)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SpecError("dataset.root", f"{path}: idx header is truncated")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise SpecError(
            "dataset.root", f"{path}: idx dims {dims} need {size} bytes of data, found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def _find_idx(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST idx files in `folder`, each plain or .gz (plain preferred); None if any lacks."""
    found: dict[str, Path] = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _read_fashion_idx(files: dict[str, Path]) -> ImageData:
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise SpecError(
                "dataset.root",
                f"Fashion-MNIST {split} files {files[f'{split}_x']} and {files[f'{split}_y']} hold "
                f"images {x.shape} and labels {y.shape}; expected (N, 28, 28) and (N,)",
            )
    return _image_data(
        arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None], arrays["test_y"],
        num_classes=10, crop_pad=2, flip=True,
    )


def _torchvision_fashion(root: Path, *, download: bool) -> ImageData:
    from torchvision import datasets  # see _present_only

    train = datasets.FashionMNIST(root, train=True, download=download)
    test = datasets.FashionMNIST(root, train=False, download=download)
    return _image_data(
        train.data[:, None], train.targets, test.data[:, None], test.targets,
        num_classes=10, crop_pad=2, flip=True,
    )


def load_fashion_mnist(cfg: DatasetConfig) -> ImageData:
    """Fashion-MNIST, from the first of these that has all four idx files.

    1. torchvision's layout ``<root>/FashionMNIST/raw/*-ubyte``;
    2. the four idx files, plain or gzipped, directly in ``<root>/FashionMNIST/raw`` or ``<root>``;
    3. with download on, torchvision's download into ``<root>/FashionMNIST/raw``;
    4. with download off, Debian's ``fashion-mnist`` package (:data:`DEBIAN_FASHION_MNIST`).
    """
    root = _root(cfg)
    raw = root / "FashionMNIST" / "raw"
    if all((raw / stem).is_file() for stem in _FASHION_FILES.values()):
        return _torchvision_fashion(root, download=False)
    for folder in (raw, root):
        files = _find_idx(folder)
        if files is not None:
            return _read_fashion_idx(files)
    if cfg.download:
        return _torchvision_fashion(root, download=True)
    files = _find_idx(DEBIAN_FASHION_MNIST)
    if files is not None:
        return _read_fashion_idx(files)
    names = ", ".join(_FASHION_FILES.values())
    raise DataNotFoundError(
        "fashion_mnist",
        str(root),
        expected=f"{names} (each plain or .gz) in {raw}, in {root} or in {DEBIAN_FASHION_MNIST}",
    )


# --- CIFAR-10/100 and SVHN
#
# torchvision checks the md5 of every extracted file against the official release before it
# reads anything, which also rejects any small file written in the same format (our tests do
# that). These subclasses make *loading* check only that the files are present; a download
# is still md5-checked, because torchvision's download path verifies the archive (CIFAR's
# tar.gz, SVHN's .mat) against its official md5 before extracting or keeping it.


@functools.cache
def _present_only(name: str) -> Any:
    """torchvision's dataset class `name` (CIFAR10, CIFAR100, SVHN) checking only that its files
    are present; see the comment above. torchvision is imported here, not with this module: its
    import pulls in torch._dynamo (about 2 s), which every Ray worker and command would otherwise
    pay for datasets most studies never read."""
    from torchvision import datasets

    base = getattr(datasets, name)
    if name == "SVHN":
        def present(self: Any) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

        return type("_SVHN", (base,), {"_check_integrity": present})

    def every_batch_present(self: Any) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, file)) for file, _ in self.train_list + self.test_list)

    # batches.meta is read by _load_meta with its own md5; md5 None means "present" there
    return type(f"_{name}", (base,), {"_check_integrity": every_batch_present, "meta": {**base.meta, "md5": None}})


def _load_cifar(cfg: DatasetConfig, torchvision_class: str, *, num_classes: int) -> ImageData:
    cls = _present_only(torchvision_class)
    root = _root(cfg)
    if not cfg.download:
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        _require(cfg.name, root, root / cls.base_folder, files)
    train = cls(root, train=True, download=cfg.download)
    test = cls(root, train=False, download=cfg.download)

    def nchw(ds: Any) -> torch.Tensor:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # torchvision keeps NHWC

    data = _image_data(
        nchw(train), train.targets, nchw(test), test.targets,
        num_classes=num_classes, crop_pad=4, flip=True,
    )
    _check_labels(cfg.name, data)
    return data


def load_cifar10(cfg: DatasetConfig) -> ImageData:
    """CIFAR-10 from torchvision's ``<root>/cifar-10-batches-py``."""
    return _load_cifar(cfg, "CIFAR10", num_classes=10)


def load_cifar100(cfg: DatasetConfig) -> ImageData:
    """CIFAR-100 (fine labels) from torchvision's ``<root>/cifar-100-python``."""
    return _load_cifar(cfg, "CIFAR100", num_classes=100)


def load_svhn(cfg: DatasetConfig) -> ImageData:
    """SVHN (train and test, not extra) from ``<root>/{train,test}_32x32.mat``; label 10 means digit 0."""
    root = _root(cfg)
    if not cfg.download:
        _require("svhn", root, root, ["train_32x32.mat", "test_32x32.mat"])
    svhn = _present_only("SVHN")
    train = svhn(root, split="train", download=cfg.download)
    test = svhn(root, split="test", download=cfg.download)
    # torchvision already maps 10 -> 0 and transposes (H, W, C, N) to NCHW.
    data = _image_data(train.data, train.labels, test.data, test.labels, num_classes=10, crop_pad=4, flip=False)
    _check_labels("svhn", data)
    return data


def _check_labels(name: str, data: ImageData) -> None:
    """Labels outside 0..C-1 would crash deep inside cross-entropy; say so here instead."""
    for split, y in (("train", data.train_y), ("test", data.test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            raise SpecError(
                "dataset.root",
                f"`{name}` {split} labels span {int(y.min())}..{int(y.max())}; expected 0..{data.num_classes - 1}",
            )


# --- npz

_NPZ_KEYS = ("image", "label", "test_image", "test_label")


def load_npz(cfg: DatasetConfig) -> ImageData:
    """Images from an .npz file: `image`, `label`, optionally `test_image`, `test_label`.

    `image` is uint8 0..255 or float in [0, 1], laid out (N, H, W) or (N, H, W, C) with C 1 or 3.
    Without test arrays, a `cfg.seed`-seeded 20% is held out as test. No augmentation by default.
    """
    path = _root(cfg)
    if not path.is_file():
        raise DataNotFoundError("npz", str(path), expected="an .npz file with arrays `image` and `label`")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise SpecError("dataset.root", f"{path} is not a readable .npz file ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SpecError("dataset.root", f"{path} holds a single array; expected an .npz with `image` and `label`")
    with archive:
        keys = set(archive.files)
        expected = "`image` and `label`, optionally with `test_image` and `test_label`"
        unknown = sorted(keys - set(_NPZ_KEYS))
        if unknown or not {"image", "label"} <= keys or ("test_image" in keys) != ("test_label" in keys):
            raise SpecError("dataset.root", f"{path} has arrays {sorted(keys)}; expected {expected}")
        x = _npz_images(path, "image", _npz_array(path, archive, "image"))
        y = _npz_labels(path, "label", _npz_array(path, archive, "label"), len(x))
        if "test_image" in keys:
            test_x = _npz_images(path, "test_image", _npz_array(path, archive, "test_image"))
            test_y = _npz_labels(path, "test_label", _npz_array(path, archive, "test_label"), len(test_x))
            if test_x.shape[1:] != x.shape[1:]:
                raise SpecError(
                    "dataset.root",
                    f"{path}: `test_image` images are {test_x.shape[1:]} (C, H, W) but `image` "
                    f"images are {x.shape[1:]}; expected the same size",
                )
        else:
            n = len(x)
            n_test = max(1, round(NPZ_TEST_FRACTION * n))
            if n - n_test < 1:
                raise SpecError("dataset.root", f"{path}: {n} image(s) cannot be split into train and test")
            perm = np.random.default_rng(cfg.seed).permutation(n)
            x, y, test_x, test_y = x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]
    num_classes = int(max(y.max(), test_y.max())) + 1
    if num_classes < 2:
        raise SpecError("dataset.root", f"{path}: every label is 0; expected at least two classes")
    return _image_data(x, y, test_x, test_y, num_classes=num_classes, crop_pad=0, flip=False)


def _npz_array(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    """One array of the archive; object (pickled) arrays are refused, as np.load is told to."""
    try:
        return archive[key]
    except ValueError as e:
        raise SpecError("dataset.root", f"{path}: `{key}` cannot be read as a numeric array ({e})") from e


def _npz_images(path: Path, key: str, a: np.ndarray) -> np.ndarray:
    """Validate an npz image array and return it as uint8 NCHW."""
    where = f"{path}: `{key}`"
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise SpecError(
            "dataset.root",
            f"{where} has shape {a.shape}; expected (N, H, W) or (N, H, W, C) with C 1 or 3 "
            "(channels last)",
        )
    if len(a) == 0:
        raise SpecError("dataset.root", f"{where} holds no images")
    if a.dtype == np.uint8:
        out = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise SpecError(
                "dataset.root",
                f"{where} is float with values in [{a.min()}, {a.max()}]; expected finite values in [0, 1]",
            )
        out = np.round(a.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise SpecError("dataset.root", f"{where} has dtype {a.dtype}; expected uint8 (0..255) or float in [0, 1]")
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _npz_labels(path: Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """Validate an npz label array: n non-negative integers."""
    where = f"{path}: `{key}`"
    if a.shape != (n,):
        raise SpecError("dataset.root", f"{where} has shape {a.shape}; expected ({n},), one label per image")
    if a.dtype.kind not in "iu":
        raise SpecError("dataset.root", f"{where} has dtype {a.dtype}; expected integer class indices")
    if a.min() < 0:
        raise SpecError("dataset.root", f"{where} has negative labels; expected class indices 0..C-1")
    return a.astype(np.int64)


LOADERS: dict[str, Callable[[DatasetConfig], ImageData]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "npz": load_npz,
}
