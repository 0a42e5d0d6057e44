"""Dataset loaders and batched augmentation (trainables/data.py).

The torchvision datasets are exercised on small files written here in each dataset's real
on-disk format, so the loaders' parsing, layout and label mapping are checked without a
download; one test reads the real Fashion-MNIST from Debian's package when it is installed.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import scipy.io
import torch

from analysis.errors import DataNotFoundError, SpecError
from trainables import data
from trainables.config import DatasetConfig, DatasetName
from trainables.data import ImageData, augment, load_dataset


def raw(cfg: DatasetConfig) -> ImageData:
    """The dataset as its loader reads it from disk: the format's own train/test split, before
    load_dataset holds out the validation split (format tests compare every stored image)."""
    return data.LOADERS[cfg.name](cfg)


# ----------------------------------------------------------------------------- format writers


def py2_pickle(d: Mapping[str, object]) -> bytes:
    """`d` pickled the way CIFAR's Python 2 batches are: keys as Python 2 byte strings.

    Opcode SHORT_BINSTRING ("U") is what Python 2 wrote for its str; torchvision loads with
    encoding="latin1", which turns those keys into str (under encoding="bytes" they are the
    b"data", b"labels" one sees in the CIFAR docs). Values are pickled by protocol 2 and spliced
    in without their PROTO header and STOP.
    """
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    for key, value in d.items():
        k = key.encode("ascii")
        out += b"U" + bytes([len(k)]) + k
        out += pickle.dumps(value, protocol=2)[2:-1]
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


def test_py2_pickle_keys_load_like_python2_strings() -> None:
    # The helper above must reproduce the real files' key behaviour, or the CIFAR tests prove nothing.
    blob = py2_pickle({"data": np.arange(3, dtype=np.uint8), "labels": [1, 2, 3]})
    as_latin1 = pickle.loads(blob, encoding="latin1")
    as_bytes = pickle.loads(blob, encoding="bytes")
    assert set(as_latin1) == {"data", "labels"}
    assert set(as_bytes) == {b"data", b"labels"}
    np.testing.assert_array_equal(as_latin1["data"], [0, 1, 2])


def idx_bytes(a: np.ndarray) -> bytes:
    """An idx file: 0, 0, type 0x08 (unsigned byte), ndim; big-endian int32 dims; the bytes."""
    assert a.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}i", *a.shape) + a.tobytes()


FASHION_STEMS = {
    "train-images-idx3-ubyte": "train_x",
    "train-labels-idx1-ubyte": "train_y",
    "t10k-images-idx3-ubyte": "test_x",
    "t10k-labels-idx1-ubyte": "test_y",
}


def fashion_arrays() -> dict[str, np.ndarray]:
    """5 train and 3 test 28x28 images with a marked pixel, labels 0..9."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train_y": np.array([9, 0, 3, 7, 1], dtype=np.uint8),
        "test_x": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_y": np.array([2, 8, 5], dtype=np.uint8),
    }
    arrays["train_x"][2, 3, 17] = 201  # image 2, row 3, column 17
    return arrays


def write_fashion(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, key in FASHION_STEMS.items():
        blob = idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / stem).write_bytes(blob)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """n CIFAR rows: 3072 bytes each, R plane then G then B, each 32x32 row-major."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def assert_fashion_matches(d: ImageData, arrays: dict[str, np.ndarray]) -> None:
    assert d.train_x.shape == (5, 1, 28, 28) and d.test_x.shape == (3, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.train_x[2, 0, 3, 17] == 201
    np.testing.assert_array_equal(d.train_x[:, 0].numpy(), arrays["train_x"])
    np.testing.assert_array_equal(d.test_x[:, 0].numpy(), arrays["test_x"])
    assert d.train_y.tolist() == [9, 0, 3, 7, 1] and d.test_y.tolist() == [2, 8, 5]
    assert (d.num_classes, d.crop_pad, d.flip) == (10, 2, True)


# ----------------------------------------------------------------------------- registry


def test_every_configurable_dataset_has_a_loader() -> None:
    # A name the config accepts but no loader serves would fail only at trial start.
    assert set(data.LOADERS) == set(get_args(DatasetName))


def test_unknown_name_is_a_spec_error() -> None:
    # DatasetConfig built directly skips parse_trial; load_dataset still names the key.
    with pytest.raises(SpecError) as err:
        load_dataset(DatasetConfig(name="mnist"))  # type: ignore[arg-type]
    assert err.value.key == "dataset.name"


# ----------------------------------------------------------------------------- CIFAR / SVHN


def test_cifar10_reads_python_batches(tmp_path: Path) -> None:
    # Rows are R, G, B planes of 32x32: byte 1024 + 5*32 + 7 is green at row 5, column 7.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_rows(2, seed=i) for i in range(5)]
    batches[1][0, 1024 + 5 * 32 + 7] = 200
    for i, rows in enumerate(batches):
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        batch = {"batch_label": f"training batch {i + 1} of 5", "labels": labels, "data": rows}
        (folder / f"data_batch_{i + 1}").write_bytes(py2_pickle(batch))
    test_rows = cifar_rows(3, seed=9)
    (folder / "test_batch").write_bytes(py2_pickle({"labels": [4, 5, 6], "data": test_rows}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": names, "num_vis": 3072}))

    d = raw(DatasetConfig(name="cifar10", root=str(tmp_path)))

    assert d.train_x.shape == (10, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.train_x[2, 1, 5, 7] == 200  # batch 2, image 0 is training image 2
    np.testing.assert_array_equal(d.train_x.numpy(), np.concatenate(batches).reshape(10, 3, 32, 32))
    np.testing.assert_array_equal(d.test_x.numpy(), test_rows.reshape(3, 3, 32, 32))
    assert d.train_y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and d.test_y.tolist() == [4, 5, 6]
    assert (d.num_classes, d.crop_pad, d.flip) == (10, 4, True)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    # CIFAR-100 has one `train` and one `test` file; the class is the fine label, not the coarse.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_rows, test_rows = cifar_rows(4, seed=1), cifar_rows(2, seed=2)
    train_rows[3, 2 * 1024 + 31 * 32 + 0] = 17  # blue, last row, first column of image 3
    (folder / "train").write_bytes(
        py2_pickle({"fine_labels": [99, 0, 42, 7], "coarse_labels": [19, 4, 1, 3], "data": train_rows})
    )
    (folder / "test").write_bytes(py2_pickle({"fine_labels": [5, 98], "coarse_labels": [0, 1], "data": test_rows}))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta))

    d = raw(DatasetConfig(name="cifar100", root=str(tmp_path)))

    assert d.train_x.shape == (4, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert d.train_x[3, 2, 31, 0] == 17
    np.testing.assert_array_equal(d.test_x.numpy(), test_rows.reshape(2, 3, 32, 32))
    assert d.train_y.tolist() == [99, 0, 42, 7] and d.test_y.tolist() == [5, 98]
    assert d.num_classes == 100


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path: Path) -> None:
    # SVHN's X is (H, W, C, N); y is (N, 1) with 10 standing for the digit 0.
    rng = np.random.default_rng(3)
    train_x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    train_x[5, 7, 2, 1] = 123  # row 5, column 7, blue, image 1
    test_x = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": train_x, "y": np.array([[10], [1], [5], [10]], np.uint8)})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": test_x, "y": np.array([[9], [10]], np.uint8)})

    d = raw(DatasetConfig(name="svhn", root=str(tmp_path)))

    assert d.train_x.shape == (4, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8
    assert d.train_x[1, 2, 5, 7] == 123
    np.testing.assert_array_equal(d.test_x.numpy(), test_x.transpose(3, 2, 0, 1))
    assert d.train_y.tolist() == [0, 1, 5, 0] and d.test_y.tolist() == [9, 0]
    assert (d.num_classes, d.crop_pad, d.flip) == (10, 4, False)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_reads_torchvision_raw_layout(tmp_path: Path) -> None:
    # torchvision's own layout: uncompressed idx files under <root>/FashionMNIST/raw.
    arrays = fashion_arrays()
    write_fashion(tmp_path / "FashionMNIST" / "raw", arrays, gz=False)
    assert_fashion_matches(raw(DatasetConfig(name="fashion_mnist", root=str(tmp_path))), arrays)


def test_fashion_mnist_reads_gzipped_idx_in_flat_dir(tmp_path: Path) -> None:
    # The Debian/original layout: the four .gz files directly in root, read by our idx reader.
    arrays = fashion_arrays()
    write_fashion(tmp_path, arrays, gz=True)
    assert_fashion_matches(raw(DatasetConfig(name="fashion_mnist", root=str(tmp_path))), arrays)


def test_idx_reader_rejects_a_truncated_file(tmp_path: Path) -> None:
    # A short download must not be silently reshaped: dims promise more bytes than there are.
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-10])
    with pytest.raises(SpecError, match="need 1568 bytes"):
        data.read_idx(path)


@pytest.mark.skipif(
    not data.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"Debian's fashion-mnist package is not installed ({data.DEBIAN_FASHION_MNIST} absent)",
)
def test_fashion_mnist_falls_back_to_debian_package(tmp_path: Path) -> None:
    # An empty root with download off reads the full 60,000/10,000 set, 6,000/1,000 per class.
    d = raw(DatasetConfig(name="fashion_mnist", root=str(tmp_path)))
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.train_y).tolist() == [6000] * 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "fashion_mnist"])
def test_missing_files_without_download_raise_data_not_found(
    name: DatasetName, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never torchvision's RuntimeError: the user gets the one-line error naming the root.
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(DataNotFoundError, match=f"`{name}` not found under {tmp_path}"):
        load_dataset(DatasetConfig(name=name, root=str(tmp_path), download=False))


def test_data_not_found_names_the_missing_file(tmp_path: Path) -> None:
    # A partial copy (test batch absent) says which file is missing, not just "not found".
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]:
        (folder / name).write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="missing: test_batch"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))


def test_root_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default root is "~/data"; "~" must mean the user's home, not a directory named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    np.savez(tmp_path / "set.npz", image=np.zeros((5, 4, 4), np.uint8), label=np.array([0, 1, 0, 1, 1]))
    d = raw(DatasetConfig(name="npz", root="~/set.npz"))
    assert len(d.train_y) + len(d.test_y) == 5


# ----------------------------------------------------------------------------- npz


def test_npz_uint8_nhw_with_test_arrays(tmp_path: Path) -> None:
    # (N, H, W) uint8 gains a channel axis; given test arrays are used as they are.
    rng = np.random.default_rng(0)
    image, test_image = rng.integers(0, 256, (6, 5, 7), np.uint8), rng.integers(0, 256, (2, 5, 7), np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, image=image, label=np.array([0, 1, 2, 0, 1, 2]), test_image=test_image, test_label=np.array([4, 0]))

    d = raw(DatasetConfig(name="npz", root=str(path)))

    assert d.train_x.shape == (6, 1, 5, 7) and d.test_x.shape == (2, 1, 5, 7)
    np.testing.assert_array_equal(d.train_x[:, 0].numpy(), image)
    np.testing.assert_array_equal(d.test_x[:, 0].numpy(), test_image)
    assert d.train_y.tolist() == [0, 1, 2, 0, 1, 2] and d.test_y.tolist() == [4, 0]
    assert (d.num_classes, d.crop_pad, d.flip) == (5, 0, False)  # max label 4 (in test) + 1


def test_npz_float_nhwc_without_test_arrays_holds_out_20_percent(tmp_path: Path) -> None:
    # Float [0, 1] becomes round(v * 255); NHWC becomes NCHW; 20% of 10 images go to test.
    rng = np.random.default_rng(1)
    image = rng.random((10, 4, 6, 3)).astype(np.float32)
    image[:, 0, 0, 2] = np.arange(10) / 255  # blue top-left pixel encodes the image index
    label = np.arange(10) % 3
    path = tmp_path / "set.npz"
    np.savez(path, image=image, label=label)

    d = raw(DatasetConfig(name="npz", root=str(path), seed=0))

    assert d.train_x.shape == (8, 3, 4, 6) and d.test_x.shape == (2, 3, 4, 6)
    x, y = torch.cat([d.train_x, d.test_x]), torch.cat([d.train_y, d.test_y])
    index = x[:, 2, 0, 0].long()  # which original image each row is
    assert sorted(index.tolist()) == list(range(10))  # a partition: nothing lost or repeated
    expected = torch.from_numpy(np.round(image.astype(np.float64) * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    assert torch.equal(x, expected[index])
    assert torch.equal(y, torch.from_numpy(label)[index])


@pytest.mark.parametrize(
    ("arrays", "complaint"),
    [
        ({"images": np.zeros((4, 5, 5), np.uint8), "label": np.zeros(4, np.int64)}, "has arrays"),
        ({"image": np.zeros((4, 5, 5), np.uint8)}, "has arrays"),
        ({"image": np.zeros((4, 5, 5), np.uint8), "label": np.arange(4), "test_image": np.zeros((1, 5, 5), np.uint8)},
         "has arrays"),
        ({"image": np.zeros((4, 3, 5, 5), np.uint8), "label": np.arange(4)}, r"C 1 or 3"),
        ({"image": np.zeros((4, 5), np.uint8), "label": np.arange(4)}, r"expected \(N, H, W\)"),
        ({"image": np.full((4, 5, 5), 2.0), "label": np.arange(4)}, r"expected finite values in \[0, 1\]"),
        ({"image": np.zeros((4, 5, 5), np.int64), "label": np.arange(4)}, "expected uint8"),
        ({"image": np.zeros((4, 5, 5), np.uint8), "label": np.arange(3)}, "one label per image"),
        ({"image": np.zeros((4, 5, 5), np.uint8), "label": np.array([0.0, 1, 1, 0])}, "integer class indices"),
        ({"image": np.zeros((4, 5, 5), np.uint8), "label": np.array([0, -1, 1, 0])}, "negative labels"),
        ({"image": np.zeros((4, 5, 5), np.uint8), "label": np.arange(4),
          "test_image": np.zeros((2, 6, 6), np.uint8), "test_label": np.arange(2)}, "expected the same size"),
    ],
    ids=["misspelt-key", "no-label", "test-image-alone", "nchw", "2d", "float-over-1", "int64-image",
         "label-count", "float-labels", "negative-label", "test-size-mismatch"],
)
def test_bad_npz_is_a_spec_error(tmp_path: Path, arrays: dict[str, Any], complaint: str) -> None:
    # Each malformed file names dataset.root and says what was expected.
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(SpecError, match=complaint) as err:
        load_dataset(DatasetConfig(name="npz", root=str(path)))
    assert err.value.key == "dataset.root"


def test_npz_that_is_not_an_archive_is_a_spec_error(tmp_path: Path) -> None:
    # A text file named .npz is the user's mistake, reported as such rather than as a zip traceback.
    path = tmp_path / "notes.npz"
    path.write_text("not an archive")
    with pytest.raises(SpecError, match="not a readable .npz"):
        load_dataset(DatasetConfig(name="npz", root=str(path)))


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_dataset(DatasetConfig(name="digits", seed=0))


def test_digits_shapes_and_range(digits: ImageData) -> None:
    # 1797 images: 1400 train and 397 test as read; 200 of the 1400 held out for validation.
    whole = raw(DatasetConfig(name="digits"))
    assert whole.train_x.shape == (1400, 1, 8, 8) and whole.test_x.shape == (397, 1, 8, 8)
    assert digits.train_x.shape == (1200, 1, 8, 8) and digits.val_x.shape == (200, 1, 8, 8) and digits.test_x.shape == (397, 1, 8, 8)
    assert digits.train_x.dtype == torch.uint8 and digits.train_y.dtype == torch.int64
    assert int(digits.train_x.max()) == 255 and int(digits.train_x.min()) == 0
    assert (digits.num_classes, digits.crop_pad, digits.flip) == (10, 0, False)


def test_digits_split_is_fixed_by_seed(digits: ImageData) -> None:
    # Same seed: identical split (every method in a study sees the same test set); new seed: another.
    again = load_dataset(DatasetConfig(name="digits", seed=0))
    other = load_dataset(DatasetConfig(name="digits", seed=1))
    assert torch.equal(again.test_x, digits.test_x) and torch.equal(again.train_y, digits.train_y)
    assert torch.equal(again.val_index, digits.val_index)
    assert not torch.equal(other.test_x, digits.test_x) and not torch.equal(other.val_index, digits.val_index)


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[bytes, int]]:
    return sorted((bytes(a.numpy()), int(b)) for a, b in zip(x, y, strict=True))


def test_validation_split_is_held_out_of_the_training_set(digits: ImageData) -> None:
    # train + val is the loader's training split, image for image (a partition: nothing shared,
    # nothing lost); the test split is untouched
    whole = raw(DatasetConfig(name="digits"))
    assert _rows(torch.cat([digits.train_x, digits.val_x]), torch.cat([digits.train_y, digits.val_y])) == _rows(whole.train_x, whole.train_y)
    assert torch.equal(digits.val_x, whole.train_x[digits.val_index]) and torch.equal(digits.val_y, whole.train_y[digits.val_index])
    assert torch.equal(digits.test_x, whole.test_x)


def test_validation_split_ignores_train_size_and_label_noise(digits: ImageData) -> None:
    # the same validation images whatever is trained on, with their true labels under label noise
    other = load_dataset(DatasetConfig(name="digits", seed=0, train_size=300, label_noise=0.5))
    assert torch.equal(other.val_index, digits.val_index) and torch.equal(other.val_y, digits.val_y)
    assert torch.equal(other.val_x, digits.val_x)


def test_val_size_sets_the_split_and_each_dataset_has_a_default() -> None:
    small = load_dataset(DatasetConfig(name="digits", val_size=50))
    assert small.val_x.shape[0] == 50 and small.train_x.shape[0] == 1350
    assert DatasetConfig(name="cifar10").val_size == 1000 and DatasetConfig(name="digits").val_size == 200
    assert DatasetConfig(name="npz").val_size is None  # resolved at load: 10% of its training images


def test_npz_holds_out_a_tenth_of_its_training_images_for_validation(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    np.savez(path, image=np.zeros((50, 4, 4), np.uint8), label=np.arange(50) % 5)
    d = load_dataset(DatasetConfig(name="npz", root=str(path)))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (36, 4, 10)  # 40 train after 20% test; 10% of 40


def test_a_validation_split_that_leaves_too_little_to_train_on_is_refused() -> None:
    with pytest.raises(SpecError, match="leaving fewer than 2") as err:
        load_dataset(DatasetConfig(name="digits", val_size=1399))
    assert err.value.key == "dataset.val_size"


def test_train_size_keeps_a_seeded_subset(digits: ImageData) -> None:
    # The subset is made of the training images left after the validation split, in the same pairs.
    small = load_dataset(DatasetConfig(name="digits", seed=0, train_size=100))
    assert small.train_x.shape == (100, 1, 8, 8) and torch.equal(small.test_x, digits.test_x)
    full = {(bytes(x.numpy()), int(y)) for x, y in zip(digits.train_x, digits.train_y, strict=True)}
    assert all((bytes(x.numpy()), int(y)) in full for x, y in zip(small.train_x, small.train_y, strict=True))


def test_train_size_larger_than_the_set_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="has 1200 once 200 are held out") as err:
        load_dataset(DatasetConfig(name="digits", train_size=1201))
    assert err.value.key == "dataset.train_size"


def test_label_noise_changes_exactly_that_fraction(digits: ImageData) -> None:
    # round(0.2 * 1200) = 240 labels move to another class; images and the other labels stay.
    noisy = load_dataset(DatasetConfig(name="digits", seed=0, label_noise=0.2))
    changed = noisy.train_y != digits.train_y
    assert int(changed.sum()) == 240
    assert torch.equal(noisy.train_x, digits.train_x) and torch.equal(noisy.test_y, digits.test_y)
    assert int(noisy.train_y.min()) >= 0 and int(noisy.train_y.max()) < 10


def test_label_noise_spreads_over_the_other_classes(digits: ImageData) -> None:
    # Symmetric noise: with 9 other classes and 240 changes, every other class receives some.
    noisy = load_dataset(DatasetConfig(name="digits", seed=0, label_noise=0.2))
    changed = noisy.train_y != digits.train_y
    offsets = (noisy.train_y[changed] - digits.train_y[changed]) % 10
    assert set(offsets.tolist()) == set(range(1, 10))


def test_augmentation_resolves_from_config_over_dataset_default() -> None:
    # crop_pad/flip None keep the dataset's default (digits: none); set values win.
    d = load_dataset(DatasetConfig(name="digits", crop_pad=2, flip=True))
    assert (d.crop_pad, d.flip) == (2, True)


def test_to_moves_tensors_and_keeps_metadata(digits: ImageData) -> None:
    moved = digits.to(torch.device("cpu"))
    assert moved.train_x.device.type == "cpu" and torch.equal(moved.test_y, digits.test_y)
    assert (moved.num_classes, moved.crop_pad, moved.flip) == (10, 0, False)


# ----------------------------------------------------------------------------- augment


def distinct_batch(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images whose pixels are all distinct and non-zero, so any shift or flip is identifiable.

    uint8 holds 255 distinct non-zero values: 8 samples of 1x5x6 use 240 of them.
    """
    n, c, h, w = (64, 2, 6, 5) if dtype.is_floating_point else (8, 1, 5, 6)
    return torch.arange(1, n * c * h * w + 1).view(n, c, h, w).to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_keeps_shape_and_dtype(dtype: torch.dtype) -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8)).to(dtype)
    out = augment(x, crop_pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype


def test_augment_without_crop_or_flip_is_identity() -> None:
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment(x, crop_pad=0, flip=False), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_is_a_per_sample_shift_of_the_zero_padded_image(dtype: torch.dtype) -> None:
    # Each output equals padded[dy:dy+H, dx:dx+W] for exactly one offset; both dy and dx vary by sample.
    x, p = distinct_batch(dtype), 2
    out = augment(x, crop_pad=p, flip=False, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[2:]
    offsets = []
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len({dy for dy, _ in offsets}) > 1 and len({dx for _, dx in offsets}) > 1


def test_flip_only_gives_each_sample_itself_or_its_mirror() -> None:
    # With p = 0.5 per sample, a batch of 64 holds both outcomes; no other result is possible.
    x = distinct_batch()
    out = augment(x, crop_pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x, strict=True)])
    mirrored = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=True)])
    assert bool((kept ^ mirrored).all())
    assert 0 < int(mirrored.sum()) < len(x)


def test_augment_is_reproducible_with_a_seeded_generator() -> None:
    # The same generator seed gives the same crops and flips (a trial's seed fixes its data stream).
    x = distinct_batch()
    a = augment(x, crop_pad=2, flip=True, generator=torch.Generator().manual_seed(7))
    b = augment(x, crop_pad=2, flip=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_pool_averages_blocks_of_pixels() -> None:
    # pool 2 turns each 2x2 block into its rounded mean, on train and test alike
    full = load_dataset(DatasetConfig(name="digits"))
    pooled = load_dataset(DatasetConfig(name="digits", pool=2))
    assert pooled.train_x.shape[-2:] == (4, 4) and pooled.test_x.shape[-2:] == (4, 4)
    block = full.train_x[0, 0, :2, :2].float().mean().round()
    assert pooled.train_x[0, 0, 0, 0] == block


def test_pool_that_does_not_divide_the_size_is_refused() -> None:
    with pytest.raises(SpecError, match="dataset.pool"):
        load_dataset(DatasetConfig(name="digits", pool=3))
