"""Locating, validating and loading Fashion-MNIST; the Dataset APIs; the device loader."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from workflow_fixtures import (
    FILES,
    REAL_DATA,
    deny_reading,
    fake_split,
    idx_bytes,
    needs_real_data,
    write_fake_dataset,
    write_idx,
)

from fastmlp.workflow import data
from fastmlp.workflow.data import DataFormatError, DataNotFoundError
from fastmlp.workflow.loader import DeviceLoader


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fake") / "plain"
    write_fake_dataset(folder)
    return folder


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $FASTMLP_DATA, an empty cache and no Debian folder: nothing can be found."""
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    return tmp_path


def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


# ---------------------------------------------------------------- IDX parsing (small files)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    images, labels = fake_split(7, seed=3)
    p_img = write_idx(tmp_path / "img", images, gz=gz)
    p_lbl = write_idx(tmp_path / "lbl", labels, gz=gz)
    assert torch.equal(data.read_idx(p_img, (7, 28, 28)), images)
    assert torch.equal(data.read_idx(p_lbl, (7,)), labels)


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    images, _ = fake_split(3, seed=0)
    p = tmp_path / "no-suffix"
    p.write_bytes(gzip.compress(idx_bytes(images)))
    assert torch.equal(data.read_idx(p, (3, 28, 28)), images)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:2], "truncated"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic"),
        (lambda b: b"\x12\x34\x08\x03" + b[4:], "magic"),
        (lambda b: b"\x00\x00\x08\x02" + b[4:], "magic"),
    ],
)
def test_damaged_idx_names_file_and_problem(tmp_path: Path, damage, message: str) -> None:
    images, _ = fake_split(5, seed=0)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(damage(idx_bytes(images)))
    with pytest.raises(DataFormatError, match=message) as info:
        data.read_idx(p, (5, 28, 28))
    assert str(p) in str(info.value)


def test_wrong_dimensions(tmp_path: Path) -> None:
    images, _ = fake_split(5, seed=0)
    p = write_idx(tmp_path / "x", images)
    with pytest.raises(DataFormatError, match=r"dimensions are \(5, 28, 28\), expected"):
        data.read_idx(p, (6, 28, 28))


def test_truncated_gzip(tmp_path: Path) -> None:
    images, _ = fake_split(50, seed=0)
    raw = gzip.compress(idx_bytes(images))
    p = tmp_path / "x.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="gzip data is truncated or corrupt") as info:
        data.read_idx(p, (50, 28, 28))
    assert str(p) in str(info.value)


# ---------------------------------------------------------------- locating full-size files


def test_load_split_from_fake_folder(fake_dir: Path, isolated: Path) -> None:
    x, y = data.load_split(True, fake_dir, download=False)
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.equal(y[:12], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    xt, _ = data.load_split(False, fake_dir, download=False)
    assert xt.shape == (10000, 28, 28)


def test_search_order_env_then_cache_then_debian(
    fake_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = copy_dataset(fake_dir, isolated / "debian")
    assert data.find_data_dir(download=False) == debian
    cache = copy_dataset(fake_dir, isolated / "cache" / "fastmlp" / "FashionMNIST" / "raw")
    assert data.find_data_dir(download=False) == cache  # torchvision layout in the cache
    env = copy_dataset(fake_dir, isolated / "env")
    monkeypatch.setenv("FASTMLP_DATA", str(env))
    assert data.find_data_dir(download=False) == env


def test_torchvision_layout_under_explicit_root(fake_dir: Path, isolated: Path) -> None:
    raw = copy_dataset(fake_dir, isolated / "root" / "FashionMNIST" / "raw")
    assert data.find_data_dir(isolated / "root", download=False) == raw


def test_gzipped_files_accepted(isolated: Path) -> None:
    folder = isolated / "gz"
    folder.mkdir()
    # Only the small label files are compressed here; image gzip is covered above.
    tensors = write_fake_dataset(folder)
    for key in ("train_labels", "test_labels"):
        stem = FILES[key][0]
        (folder / stem).unlink()
        write_idx(folder / (stem + ".gz"), tensors[key], gz=True)
    _, y = data.load_split(False, folder, download=False)
    assert torch.equal(y, tensors["test_labels"].long())


def test_not_found_lists_every_place_and_advice(isolated: Path, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        data.find_data_dir(download=False)
    msg = str(info.value)
    for d in data.candidate_dirs():
        assert str(d) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "FASTMLP_DATA" in msg


def test_download_failure_is_reported(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(target: Path) -> Path:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nsecond line")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataNotFoundError) as info:
        data.find_data_dir(download=True)
    msg = str(info.value)
    assert f"download into {data.cache_dir()} failed: RuntimeError: Error downloading" in msg
    assert "second line" not in msg  # one line per place looked at


def test_explicit_root_is_not_silently_replaced(
    fake_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTMLP_DATA", str(fake_dir))
    with pytest.raises(DataNotFoundError, match="typo"):
        data.find_data_dir(isolated / "typo", download=True)
    assert not (isolated / "typo").exists()  # no folder created, nothing downloaded


def test_partial_folder_reports_missing_files(fake_dir: Path, isolated: Path) -> None:
    part = isolated / "part"
    part.mkdir()
    shutil.copy(fake_dir / "t10k-labels-idx1-ubyte", part)
    with pytest.raises(DataNotFoundError, match="missing train-images-idx3-ubyte"):
        data.find_data_dir(part, download=False)


def test_unreadable_data_file_says_permission_denied(
    fake_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = isolated / "locked"
    folder.mkdir()
    for f in fake_dir.iterdir():
        shutil.copy(f, folder)
    deny_reading(monkeypatch, folder / "train-labels-idx1-ubyte")
    with pytest.raises(data.DataReadError) as info:
        data.load_split(True, folder, download=False)
    assert str(info.value) == f"cannot read {folder / 'train-labels-idx1-ubyte'}: permission denied"


def test_a_data_file_that_is_a_symlink_loop_is_named_as_such(
    fake_dir: Path, isolated: Path
) -> None:
    folder = copy_dataset(fake_dir, isolated / "looped")
    (folder / "t10k-images-idx3-ubyte").unlink()
    (folder / "t10k-images-idx3-ubyte").symlink_to("t10k-images-idx3-ubyte")
    with pytest.raises(DataNotFoundError) as info:
        data.find_data_dir(folder, download=False)
    assert "missing t10k-images-idx3-ubyte (t10k-images-idx3-ubyte: it is a symlink loop" in str(
        info.value
    )


def test_truncated_full_file_is_an_error_not_a_short_dataset(
    fake_dir: Path, isolated: Path
) -> None:
    bad = copy_dataset(fake_dir, isolated / "bad")
    target = bad / "t10k-images-idx3-ubyte"
    content = target.read_bytes()
    target.unlink()
    target.write_bytes(content[: len(content) - 784 * 3])
    with pytest.raises(DataFormatError, match="truncated") as info:
        data.load_split(False, bad, download=False)
    assert "t10k-images-idx3-ubyte" in str(info.value)


def test_label_out_of_range(fake_dir: Path, isolated: Path) -> None:
    bad = copy_dataset(fake_dir, isolated / "bad")
    labels = torch.arange(10000, dtype=torch.uint8) % 10
    labels[1234] = 10
    (bad / "t10k-labels-idx1-ubyte").unlink()
    write_idx(bad / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DataFormatError, match="label 10 at index 1234"):
        data.load_split(False, bad, download=False)


# ---------------------------------------------------------------- tutorial Dataset API


def test_fashion_mnist_dataset_like_torchvision(fake_dir: Path, isolated: Path) -> None:
    from torchvision.transforms import Lambda, ToTensor

    one_hot = Lambda(
        lambda y: torch.zeros(10, dtype=torch.float).scatter_(0, torch.tensor(y), value=1)
    )
    ds = data.FashionMNIST(fake_dir, train=False, transform=ToTensor(), target_transform=one_hot)
    assert len(ds) == 10000
    img, target = ds[3]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32
    assert torch.allclose(img[0], ds.data[3].float() / 255)
    assert target.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    features, labels = next(iter(loader))
    assert features.shape == (64, 1, 28, 28) and labels.shape == (64, 10)
    raw_img, raw_label = data.FashionMNIST(fake_dir, train=False)[0]
    assert raw_img.size == (28, 28) and raw_label == 0  # PIL image and int, as torchvision
    assert data.labels_map[9] == "Ankle Boot" and len(data.labels_map) == 10


def write_png(path: Path, value: int) -> None:
    from PIL import Image

    Image.new("L", (28, 28), value).save(path)


def test_custom_image_dataset(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_png(imgs / "tshirt1.png", 10)
    write_png(imgs / "boot1.png", 200)
    csv = tmp_path / "labels.csv"
    csv.write_text("file_name,label\ntshirt1.png, 0\n\nboot1.png,9\n")
    ds = data.CustomImageDataset(csv, imgs)
    assert len(ds) == 2
    image, label = ds[1]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert int(image[0, 0, 0]) == 200 and label == 9


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tshirt1.png,0\nmissing.png,1\n", r"labels.csv:2: image .*missing.png not found"),
        ("tshirt1.png,zero\n", r"labels.csv:1: label 'zero' is not an integer"),
        ("tshirt1.png\n", r"labels.csv:1: expected 'file_name,label'"),
    ],
)
def test_custom_image_dataset_bad_rows(tmp_path: Path, content: str, message: str) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_png(imgs / "tshirt1.png", 10)
    csv = tmp_path / "labels.csv"
    csv.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.CustomImageDataset(csv, imgs)


def test_custom_image_dataset_undecodable_image(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "labels.csv").write_text("bad.png,1\n")
    ds = data.CustomImageDataset(tmp_path / "labels.csv", tmp_path)
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        ds[0]


# ---------------------------------------------------------------- device loader


def test_device_loader_batches_and_order() -> None:
    images, labels = fake_split(1000, seed=0)
    loader = DeviceLoader(images, labels.long(), batch_size=64, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 16
    assert batches[0][0].shape == (64, 1, 28, 28) and batches[-1][0].shape == (40, 1, 28, 28)
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x[:, 0], images.float() / 255)  # ToTensor scaling, original order
    assert len(loader.dataset) == 1000
    dropped = DeviceLoader(images, labels.long(), batch_size=64, drop_last=True)
    assert len(dropped) == 15 and sum(len(y) for _, y in dropped) == 960


def test_device_loader_weighted_batches_are_its_batches_with_weights() -> None:
    """Same batches, epoch for epoch, as iterating; in one process every weight is 1.0,
    the short last batch's too (weights only even out a sharded loader's uneven pieces)."""
    images, labels = fake_split(1000, seed=0)
    kw: dict = dict(batch_size=64, shuffle=True, seed=2, augment=True, max_shift=1)
    plain, weighted = DeviceLoader(images, labels, **kw), DeviceLoader(images, labels, **kw)
    for _ in range(2):
        batches = list(weighted.weighted_batches())
        assert len(batches) == len(plain) == 16
        for (x, y), (wx, wy, w) in zip(plain, batches, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy) and w == 1.0
    assert weighted.epoch == plain.epoch == 2  # each advances the epoch as iterating does


def test_device_loader_shuffle_is_seeded_per_epoch() -> None:
    images, labels = fake_split(500, seed=0)
    labels = torch.arange(500)

    def order(seed: int, epoch: int) -> torch.Tensor:
        loader = DeviceLoader(images, labels, 100, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    first = order(0, 0)
    assert sorted(first.tolist()) == list(range(500))  # a permutation: nothing lost
    assert torch.equal(first, order(0, 0))
    assert not torch.equal(first, order(0, 1))
    assert not torch.equal(first, order(1, 0))
    loader = DeviceLoader(images, labels, 100, shuffle=True, seed=0)
    epoch0, epoch1 = torch.cat([y for _, y in loader]), torch.cat([y for _, y in loader])
    assert torch.equal(epoch0, first) and torch.equal(epoch1, order(0, 1))


def test_augmentation_flips_and_shifts_only() -> None:
    images = torch.zeros(200, 28, 28, dtype=torch.uint8)
    images[:, 10:14, 3:6] = 255  # a bright block left of centre
    loader = DeviceLoader(images, torch.zeros(200), 200, augment=True, max_shift=2, seed=1)
    x, _ = next(iter(loader))
    x = x[:, 0]
    assert x.shape == (200, 28, 28)
    assert torch.all((x == 0) | (x == 1))  # integer shifts and flips never interpolate
    assert torch.all(x.sum(dim=(1, 2)) == 12)  # block never pushed off the image
    cols = (x.sum(1) > 0).float().argmax(1)
    assert (cols > 14).any() and (cols < 14).any()  # some flipped, some not
    assert len(set(cols.tolist())) > 2  # and shifted


@needs_real_data
def test_real_data_loads_and_is_balanced() -> None:
    x, y = data.load_split(True, REAL_DATA, download=False)
    assert x.shape == (60000, 28, 28)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    xt, yt = data.load_split(False, REAL_DATA, download=False)
    assert xt.shape == (10000, 28, 28)
    assert torch.equal(torch.bincount(yt), torch.full((10,), 1000))


@pytest.mark.parametrize(
    ("b", "size", "offset", "shift"), [(64, 64, 0, 2), (7, 20, 5, 1), (5, 5, 0, 0)]
)
def test_augmentation_is_flip_then_shift_of_each_image(b, size, offset, shift) -> None:
    # _augment draws for the whole global batch (flips, then row and column offsets) and
    # computes every image in one gather; per image it must be: flip, pad, crop.
    from fastmlp.workflow.loader import _augment

    x = torch.randint(0, 256, (b, 28, 28), dtype=torch.uint8)
    g = torch.Generator()
    g.manual_seed(11)
    got = _augment(x, g, shift, size, offset)
    g.manual_seed(11)
    rows = slice(offset, offset + b)
    flip = (torch.rand(size, generator=g) < 0.5)[rows]
    if shift:
        dy = torch.randint(0, 2 * shift + 1, (size, 1), generator=g)[rows, 0]
        dx = torch.randint(0, 2 * shift + 1, (size, 1), generator=g)[rows, 0]
    for i in range(b):
        img = x[i].flip(-1) if flip[i] else x[i]
        if shift:
            padded = torch.nn.functional.pad(img, (shift,) * 4)
            img = padded[dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
        assert torch.equal(got[i], img), i
