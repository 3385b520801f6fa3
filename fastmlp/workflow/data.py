"""Locating, validating and loading Fashion-MNIST.

Three layers, each usable on its own:

* :func:`find_data_dir` / :func:`load_split` find the four IDX files and return one split as
  validated ``uint8`` images ``(N, 28, 28)`` and ``int64`` labels ``(N,)``.
* :class:`FashionMNIST` and :class:`CustomImageDataset` are the tutorial's ``Dataset`` API
  (per-sample, works with ``torchvision.transforms`` and ``torch.utils.data.DataLoader``).
* :class:`~fastmlp.workflow.loader.DeviceLoader` is the fast path: the whole
  split lives on the target device and batches are gathered with one indexing op per step.
* :func:`load_image` turns any image file into a Fashion-MNIST-like 28x28 input.

This module does not need the compiled extension: it imports neither ``fastmlp._C`` nor
the modules that load it, and ``import fastmlp`` succeeds without it (only model-side
names then fail), so data problems can be diagnosed on a machine where the build failed
(``tests/test_layering.py`` checks this with the extension blocked).
"""

from __future__ import annotations

import csv
import errno
import gzip
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "IMAGE_SIZE",
    "DEBIAN_DIR",
    "CustomImageDataset",
    "DataFormatError",
    "DataNotFoundError",
    "DataReadError",
    "FashionMNIST",
    "TRAIN_SIZE",
    "cache_dir",
    "candidate_dirs",
    "file_problem",
    "find_data_dir",
    "load_image",
    "labels_map",
    "load_split",
    "read_idx",
]

#: Class names in label order, spelled as in the tutorial's ``labels_map``.
IMAGE_SIZE = 28  # Fashion-MNIST images are IMAGE_SIZE x IMAGE_SIZE pixels
CLASSES: tuple[str, ...] = (
    "T-Shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle Boot",
)
#: The tutorial's ``labels_map``: label index -> class name.
labels_map: dict[int, str] = dict(enumerate(CLASSES))

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Images in the training split.
TRAIN_SIZE = 60000
# (images file, labels file, number of samples) per split; names as published by Zalando.
_SPLITS: dict[bool, tuple[str, str, int]] = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", TRAIN_SIZE),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes; the only one Fashion-MNIST uses
_HOW_TO_GET = (
    "To get the data: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the "
    "four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) from "
    "https://github.com/zalandoresearch/fashion-mnist in a folder and pass it with "
    "--data DIR / root=DIR or set FASTMLP_DATA=DIR; on a machine with internet access the "
    "files are downloaded into the cache folder automatically."
)


class DataNotFoundError(FileNotFoundError):
    """No folder with the Fashion-MNIST files was found; the message lists where we looked."""


class DataFormatError(ValueError):
    """A data file exists but its content is not what it must be (names the file)."""


class DataReadError(OSError):
    """A data file is there but cannot be read: permission denied, a symlink loop, an I/O
    error (names the file and the reason)."""


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a file, in words, or ``None`` when it can: ``not
    found``, ``it is a broken symlink to X``, ``it is a folder, not a file``, ``permission
    denied``, ``it is a symlink loop (...)`` or the system's own reason."""
    path = Path(path)
    try:
        if path.is_dir():
            return "it is a folder, not a file"
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        if path.is_symlink():
            return f"it is a broken symlink to {os.readlink(path)}"
        return "not found"
    except PermissionError:
        return "permission denied"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "it is a symlink loop (too many levels of symbolic links)"
        return e.strerror or str(e)


def cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/fastmlp`` or ``~/.cache/fastmlp``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastmlp"


def candidate_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for the data, in order.

    An explicit ``root``, else ``$FASTMLP_DATA`` when set, is the only place searched (a
    typo must not silently pick up other data); otherwise the cache folder and the Debian
    package folder. Each folder is also searched in torchvision's layout
    (``FashionMNIST/raw``).
    """
    if root is not None:
        bases = [Path(root).expanduser()]
    elif os.environ.get("FASTMLP_DATA"):
        bases = [Path(os.environ["FASTMLP_DATA"]).expanduser()]
    else:
        bases = [cache_dir(), DEBIAN_DIR]
    dirs: list[Path] = []
    for base in bases:
        for d in (base, base / "FashionMNIST" / "raw", base / "raw"):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _find_file(folder: Path, stem: str) -> Path | None:
    # Prefer the uncompressed file: torchvision keeps both and reading it skips the inflate.
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing(folder: Path) -> list[str]:
    """The files not in ``folder``; one that is there as a link that leads nowhere says so."""
    stems = [s for split in _SPLITS.values() for s in split[:2]]
    missing = []
    for stem in stems:
        if _find_file(folder, stem) is not None:
            continue
        links = [folder / n for n in (stem, stem + ".gz") if (folder / n).is_symlink()]
        missing.append(f"{stem} ({links[0].name}: {file_problem(links[0])})" if links else stem)
    return missing


def find_data_dir(root: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Return the first folder holding all four Fashion-MNIST files.

    When none is found, no ``root`` was given and ``download`` is true, try torchvision's
    downloader into the cache folder. Raises :class:`DataNotFoundError` listing every place
    looked at. A ``$FASTMLP_DATA`` without the files is an error of its own (one line).
    """
    env = os.environ.get("FASTMLP_DATA")
    if root is None and env:
        for d in candidate_dirs():
            if d.is_dir() and not _missing(d):
                return d
        base = Path(env).expanduser()
        problem = (
            f"the Fashion-MNIST files are not in it (missing {', '.join(_missing(base))})"
            if base.is_dir()
            else "no such folder"
        )
        raise DataNotFoundError(
            f"FASTMLP_DATA={env}: {problem}; point it at the folder with the four IDX files "
            "or unset it"
        )
    looked: list[str] = []
    for d in candidate_dirs(root):
        if not d.is_dir():
            looked.append(f"  {d} (no such folder)")
            continue
        missing = _missing(d)
        if not missing:
            return d
        looked.append(f"  {d} (missing {', '.join(missing)})")
    # Download only into the cache: an explicit root is a statement of where the data is,
    # and we will not create folders or fetch 30 MB behind a typo in it.
    download_note = "  download: disabled"
    if root is not None:
        download_note = "  download: not attempted for an explicit folder"
    elif download:
        try:
            return _download(cache_dir())
        except Exception as e:  # any failure (offline, proxy, disk) ends in the same advice
            first = (str(e).strip().splitlines() or [""])[0]
            download_note = f"  download into {cache_dir()} failed: {type(e).__name__}: {first}"
    looked.append(download_note)
    raise DataNotFoundError(
        "Fashion-MNIST not found. Looked in:\n" + "\n".join(looked) + "\n" + _HOW_TO_GET
    )


def _download(target: Path) -> Path:
    from torchvision.datasets import FashionMNIST as TVFashionMNIST

    target.mkdir(parents=True, exist_ok=True)
    TVFashionMNIST(str(target), train=True, download=True)
    TVFashionMNIST(str(target), train=False, download=True)
    folder = target / "FashionMNIST" / "raw"
    if _missing(folder):
        raise DataNotFoundError(f"download finished but files are missing in {folder}")
    return folder


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        reason = file_problem(path) or e.strerror or str(e)
        raise DataReadError(f"cannot read {path}: {reason}") from None
    # Decide by content, not by file name: Debian recompresses, users gunzip by hand.
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataFormatError(f"{path}: gzip data is truncated or corrupt ({e})") from e


def read_idx(path: str | os.PathLike[str], expected_shape: tuple[int, ...]) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzipped or not) and check its header and size.

    Returns a ``uint8`` tensor of ``expected_shape``. Raises :class:`DataFormatError` naming
    the file for a bad magic number, wrong dimensions, truncation or trailing bytes.
    """
    path = Path(path)
    data = _read_bytes(path)
    ndim = len(expected_shape)
    if len(data) < 4:
        raise DataFormatError(f"{path}: file is truncated ({len(data)} bytes, no IDX header)")
    zero, dtype, got_ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE or got_ndim != ndim:
        raise DataFormatError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} "
            f"(expected 0x0000{_IDX_UBYTE:02x}{ndim:02x}: unsigned bytes, {ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: file is truncated inside the IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if shape != expected_shape:
        raise DataFormatError(f"{path}: dimensions are {shape}, expected {expected_shape}")
    n = 1
    for s in shape:
        n *= s
    if len(data) - header < n:
        raise DataFormatError(
            f"{path}: file is truncated: {len(data) - header} data bytes, expected {n}"
        )
    if len(data) - header > n:
        raise DataFormatError(f"{path}: {len(data) - header - n} unexpected trailing bytes")
    # bytearray gives torch a writable buffer (frombuffer warns on read-only bytes).
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


# Decoding the 26 MB training archive takes a noticeable fraction of a second; keep each
# split once per process, keyed by the files' identity so a replaced file is re-read.
_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def load_split(
    train: bool = True, root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as ``(images uint8 (N, 28, 28), labels int64 (N,))``, validated.

    The returned tensors are shared with an in-process cache: do not modify them in place.
    """
    folder = find_data_dir(root, download=download)
    img_stem, lbl_stem, n = _SPLITS[train]
    img_path, lbl_path = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
    assert img_path is not None and lbl_path is not None  # find_data_dir checked
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (img_path, lbl_path))
    if key in _CACHE:
        return _CACHE[key]
    images = read_idx(img_path, (n, IMAGE_SIZE, IMAGE_SIZE))
    labels = read_idx(lbl_path, (n,))
    bad = labels > 9
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise DataFormatError(
            f"{lbl_path}: label {int(labels[first])} at index {first} is outside 0-9"
        )
    _CACHE[key] = (images, labels.long())
    return _CACHE[key]


class FashionMNIST(Dataset[tuple[Any, Any]]):
    """Drop-in for ``torchvision.datasets.FashionMNIST`` that finds the data by itself.

    ``dataset[i]`` returns ``(PIL.Image, int)`` before transforms, exactly like torchvision,
    so ``ToTensor()``, ``Lambda`` and the tutorial's one-hot ``target_transform`` work.
    ``data`` (uint8 ``(N, 28, 28)``) and ``targets`` (int64 ``(N,)``) are public as there.
    """

    classes: list[str] = list(CLASSES)

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        train: bool = True,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = True,
    ) -> None:
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        self.data, self.targets = load_split(train, root, download=download)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        from PIL import Image

        img: Any = Image.fromarray(self.data[idx].numpy(), mode="L")
        target: Any = int(self.targets[idx])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class CustomImageDataset(Dataset[tuple[Any, Any]]):
    """The tutorial's ``CustomImageDataset``: a folder of images plus a ``file_name,label`` CSV.

    The CSV may have a ``file_name,label`` header and spaces after commas. Every row is
    checked when the dataset is built, so a bad row or a missing image fails at once with
    the CSV line number instead of deep inside a training epoch.
    """

    def __init__(
        self,
        annotations_file: str | os.PathLike[str],
        img_dir: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.annotations_file = Path(annotations_file)
        self.img_dir = Path(img_dir)
        self.transform = transform
        self.target_transform = target_transform
        if not self.annotations_file.is_file():
            raise FileNotFoundError(f"annotations file not found: {self.annotations_file}")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_dir}")
        self.img_labels: list[tuple[str, int]] = []
        with open(self.annotations_file, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{self.annotations_file}:{lineno}"
                if lineno == 1 and [c.strip().lower() for c in row] == ["file_name", "label"]:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{where}: expected 'file_name,label', got {row!r}")
                name, label = row[0].strip(), row[1].strip()
                try:
                    value = int(label)
                except ValueError:
                    raise ValueError(f"{where}: label {label!r} is not an integer") from None
                if not (self.img_dir / name).is_file():
                    raise FileNotFoundError(f"{where}: image {self.img_dir / name} not found")
                self.img_labels.append((name, value))

    def __len__(self) -> int:
        return len(self.img_labels)

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        from torchvision.io import read_image

        name, label = self.img_labels[idx]
        path = self.img_dir / name
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of torchcodec; the
                # tutorial's read_image still works and needs no extra dependency.
                warnings.simplefilter("ignore", DeprecationWarning)
                image: Any = read_image(str(path))
        except Exception as e:  # torchvision's errors do not name the file
            raise ValueError(f"cannot decode image {path}: {e}") from e
        target: Any = label
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def load_image(path: str | os.PathLike[str], invert: str = "auto") -> torch.Tensor:
    """An image file as a Fashion-MNIST-like ``(1, 28, 28)`` float tensor in ``[0, 1]``.

    Converted to grayscale, padded to a square with its border colour (so the aspect ratio
    survives), resized to 28x28, and inverted when it is dark-on-light (Fashion-MNIST has
    light objects on black) if ``invert`` is ``auto`` and the border is light, or ``yes``.
    A missing file raises :class:`FileNotFoundError`; one that is no image, damaged, or too
    large to decode (PIL's decompression-bomb limit) :class:`ValueError`, naming it.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if invert not in ("auto", "yes", "no"):
        raise ValueError(f"invert must be 'auto', 'yes' or 'no', got {invert!r}")
    try:
        with Image.open(path) as file:
            im = ImageOps.exif_transpose(file)
            if im.mode in ("RGBA", "LA", "P"):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)  # transparent ground -> white
            gray = im.convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    except OSError as e:  # the file's own problem (permission, a folder) before PIL's words
        raise ValueError(f"cannot read image {path}: {file_problem(path) or e}") from None
    except (Image.DecompressionBombError, MemoryError) as e:
        # PIL refuses images of more than 2 * Image.MAX_IMAGE_PIXELS pixels (179M) at open.
        raise ValueError(
            f"cannot read image {path}: too large to decode ({e or 'out of memory'}); "
            "scale it down first"
        ) from None
    x = torch.from_numpy(np.array(gray, dtype=np.uint8)).float()
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    fill = int(border.median())
    side = max(gray.size)
    square = Image.new("L", (side, side), fill)
    square.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
    small = square.resize((28, 28), Image.Resampling.LANCZOS)
    t = torch.from_numpy(np.array(small, dtype=np.uint8)).float().view(1, 28, 28) / 255.0
    if invert == "yes" or (invert == "auto" and fill > 127):
        t = 1.0 - t
    return t
