"""One training epoch of the tutorial's MLP, fastmlp against what a user would otherwise run
(pytest-benchmark).

The work is the tutorial's: 784-512-512-10 with ReLU, ``nn.CrossEntropyLoss``, SGD with
lr 1e-3, batch 64, all 60,000 training images, one epoch per round. Timed in one process:

* ``tutorial``: the seed's code unchanged but for the data path: torchvision's
  ``FashionMNIST`` with ``ToTensor()``, ``DataLoader(batch_size=64, shuffle=True)``, the
  tutorial's ``NeuralNetwork`` and its ``train_loop``;
* ``eager``: the same model, the whole split in memory as one float tensor, a ``randperm``
  per epoch and one index per batch (no DataLoader; ``fastmlp.bench.epochs.eager_epoch``);
* ``compile``: ``torch.compile`` of that model in that loop (compilation done before timing);
* ``fastmlp``: ``fastmlp.MLP``, its ``DeviceLoader`` and ``fastmlp.workflow.train.train_loop`` with
  ``FusedSGD`` (on the CPU each step is one fused kernel), float32;
* ``fastmlp-bf16``: the same under bfloat16 autocast (fp32 master weights).

``gemm`` measures the machine's matrix-multiply rate in each dtype (a 2048^3 ``torch.mm``),
which turns the epoch's FLOPs into a floor. Data loading is inside every epoch's time,
compilation and the one-off load of the files are not. On a CUDA machine the same runs
happen on the GPU too. Render the table with ``benchmarks/report.py`` (docs/benchmarks.md).

    python -m pytest benchmarks/test_bench_epoch.py --benchmark-json=epoch.json
    python benchmarks/report.py epoch.json

Knobs: FASTMLP_BENCH_ROUNDS (epochs per variant, default 3). FASTMLP_BENCH_SHORT=1 (CI's
short mode) makes an "epoch" the first 672 images (10 full batches and a partial one of
32, as 60,000 ends) and the rounds default to 1: it checks that every variant runs,
torch.compile's compilation included, and times nothing worth reading.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp.bench.epochs import (
    BATCH,
    LR,
    SIZES,
    eager_epoch,
    epoch_flops,
    fastmlp_epoch,
    gemm,
    sync,
)
from fastmlp.optim import FusedSGD
from fastmlp.testing import NeuralNetwork  # the tutorial's model, verbatim
from fastmlp.workflow import data
from fastmlp.workflow.loader import DeviceLoader

SHORT = os.environ.get("FASTMLP_BENCH_SHORT", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "1" if SHORT else "3"))
# The training images an epoch covers: all of them, or in short mode 10 full batches and a
# partial one like the full split's last (60,000 = 937 x 64 + 32).
SAMPLES = 10 * BATCH + 32 if SHORT else None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tutorial_train_loop(dataloader, model, loss_fn, optimizer, device):
    """The tutorial's train_loop; ``.to(device)`` is the only addition (a no-op on CPU)."""
    size = len(dataloader.dataset)
    for batch, (X, y) in enumerate(dataloader):
        X, y = X.to(device), y.to(device)
        pred = model(X)
        loss = loss_fn(pred, y)

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        if batch % 100 == 0:
            loss, current = loss.item(), batch * len(X)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")


@pytest.fixture(scope="module")
def train_split():
    images, labels = data.load_split(train=True)
    return images[:SAMPLES], labels[:SAMPLES]


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory) -> Path:
    """torchvision's folder layout with the uncompressed IDX files, from the data fastmlp
    found (torchvision's own download needs the internet and its MD5s of the archives)."""
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    source = data.find_data_dir()
    for split in ("train", "t10k"):
        for stem in (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"):
            if (source / stem).exists():
                shutil.copyfile(source / stem, raw / stem)
            else:
                with gzip.open(source / (stem + ".gz"), "rb") as src, open(raw / stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return root


def _record(benchmark, variant: str, device: str, dtype: str, samples: int) -> None:
    benchmark.extra_info.update(
        suite="epoch",
        variant=variant,
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        dtype=dtype,
        samples=samples,
        batch=BATCH,
        flops=epoch_flops(samples),
        threads=torch.get_num_threads(),
    )


def _run(benchmark, epoch, device: str) -> None:
    def timed():
        epoch()
        sync(device)

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("device", DEVICES)
def test_tutorial(benchmark, torchvision_root, device):
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    training_data = datasets.FashionMNIST(
        root=torchvision_root, train=True, download=False, transform=ToTensor()
    )
    if SAMPLES is not None:
        training_data = Subset(training_data, range(SAMPLES))
    train_dataloader = DataLoader(training_data, batch_size=BATCH, shuffle=True)
    torch.manual_seed(0)
    model = NeuralNetwork().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    _record(benchmark, "tutorial", device, "fp32", len(training_data))
    _run(
        benchmark,
        lambda: tutorial_train_loop(train_dataloader, model, loss_fn, optimizer, device),
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["eager", "compile"])
def test_in_memory(benchmark, train_split, variant, device):
    images = train_split[0].to(device).float().div_(255).view(-1, 1, 28, 28)
    labels = train_split[1].to(device)
    torch.manual_seed(0)
    model = NeuralNetwork().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    compile_seconds = 0.0
    if variant == "compile":
        model = torch.compile(model)
        start = time.perf_counter()
        # Compile for the full batch and for the last, partial one before timing.
        for n in (BATCH, len(labels) % BATCH or BATCH):
            loss = nn.functional.cross_entropy(model(images[:n]), labels[:n])
            loss.backward()
        optimizer.zero_grad()
        sync(device)
        compile_seconds = time.perf_counter() - start
    _record(benchmark, variant, device, "fp32", len(labels))
    benchmark.extra_info["compile_seconds"] = compile_seconds
    _run(benchmark, eager_epoch(model, optimizer, images, labels), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fastmlp(benchmark, train_split, precision, device):
    loader = DeviceLoader(*train_split, batch_size=BATCH, shuffle=True, device=device)
    torch.manual_seed(0)
    model = fastmlp.MLP(SIZES).to(device)
    optimizer = FusedSGD(model, lr=LR)
    variant = "fastmlp" if precision == "fp32" else "fastmlp-bf16"
    _record(benchmark, variant, device, precision, len(loader.y))
    _run(benchmark, fastmlp_epoch(loader, model, optimizer, precision), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm(benchmark, dtype, device):
    """The matrix-multiply rate that sets the floor: one large square torch.mm."""
    n = 2048
    mm = gemm(device, dtype, n)
    benchmark.extra_info.update(
        suite="epoch", variant="gemm", device=device, dtype=dtype, flops=2 * n**3
    )

    rounds, warmup = (ROUNDS, 0) if SHORT else (ROUNDS * 3, 1)
    benchmark.pedantic(mm, rounds=rounds, iterations=1, warmup_rounds=warmup)
