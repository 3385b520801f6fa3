"""How fast fastmlp is on this machine: ``fastmlp bench`` (about a minute) and the
workloads of the epoch benchmark suite (benchmarks/test_bench_epoch.py runs these same
functions under pytest-benchmark).

The work is the tutorial's: 784-512-512-10 with ReLU, cross-entropy, SGD with lr 1e-3,
batch 64. Measured in one process, each variant after a warm-up:

* ``eager``: the tutorial's ``NeuralNetwork`` with ``torch.optim.SGD``, the split in memory
  as one float tensor, a ``randperm`` per epoch (what a user writes without fastmlp, minus
  the DataLoader, which would only make eager slower);
* ``compile`` (optional, slow to compile): the same under ``torch.compile``;
* ``fastmlp``: ``fastmlp.MLP``, its ``DeviceLoader`` and ``train_loop`` with ``FusedSGD``;

each in fp32 and bf16 (autocast, fp32 master weights). The images are random: speed does
not depend on them, and the command needs no dataset. The floor is the epoch's FLOPs at
the measured rate of one large ``torch.mm`` in that dtype.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fastmlp import hardware
from fastmlp.testing import NeuralNetwork
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.loops import autocast, train_loop

__all__ = [
    "BATCH",
    "LR",
    "SIZES",
    "BenchResult",
    "eager_epoch",
    "epoch_flops",
    "fastmlp_epoch",
    "format_table",
    "gemm",
    "gemm_rate",
    "run",
]

BATCH = 64
LR = 1e-3
SIZES = (784, 512, 512, 10)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def epoch_flops(samples: int, sizes: Sequence[int] = SIZES) -> int:
    """Multiply-adds x 2 of one epoch: forward, weight gradients, and input gradients of
    every layer but the first (the images need no gradient)."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=False))
    forward = sum(i * o for i, o in pairs)
    grad_input = sum(i * o for i, o in pairs[1:])
    return 2 * samples * (2 * forward + grad_input)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gemm(device: torch.device | str, precision: str, n: int = 2048) -> Callable[[], None]:
    """One n x n x n ``torch.mm`` in ``precision`` on random operands, synchronized: the
    measure of the machine's GEMM rate that sets the floor."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(_DTYPES[precision])
    b = torch.randn(n, n, generator=gen, device=device).to(_DTYPES[precision])
    out = torch.empty_like(a)

    def mm() -> None:
        torch.mm(a, b, out=out)
        sync(device)

    return mm


def gemm_rate(device: torch.device | str, precision: str, n: int = 2048, rounds: int = 5) -> float:
    """FLOP/s of :func:`gemm` (median of ``rounds`` after a warm-up)."""
    mm = gemm(device, precision, n)
    mm()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        mm()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def eager_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    precision: str = "fp32",
    batch: int = BATCH,
) -> Callable[[], None]:
    """One epoch of the tutorial's step over in-memory float images, as a function."""
    loss_fn = nn.CrossEntropyLoss()
    device = images.device

    def epoch() -> None:
        order = torch.randperm(len(labels), device=device)
        for start in range(0, len(labels), batch):
            idx = order[start : start + batch]
            with autocast(device, precision):
                loss = loss_fn(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def fastmlp_epoch(
    loader: DeviceLoader, model: nn.Module, optimizer: torch.optim.Optimizer, precision: str
) -> Callable[[], None]:
    """One epoch of ``fastmlp.workflow.loops.train_loop`` (FusedSGD: one kernel per step on
    the CPU)."""
    loss_fn = nn.CrossEntropyLoss()

    def epoch() -> None:
        train_loop(loader, model, loss_fn, optimizer, precision=precision, log=None)

    return epoch


@dataclass
class Run:
    variant: str  # eager | compile | fastmlp
    precision: str
    step_ms: float
    epoch_s: float
    floor_s: float
    scaled: bool  # timed on part of the epoch (emulated bf16) and scaled up


@dataclass
class BenchResult:
    machine: dict[str, Any]
    auto_precision: str
    samples: int
    gemm_gflops: dict[str, float]
    runs: list[Run] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _time_steps(
    step: Callable[[], None], device: torch.device | str, steps: int, repeats: int = 3
) -> float:
    """Median seconds per step over ``repeats`` runs of ``steps`` steps."""
    step()  # warm-up (allocations, kernels' caches, bf16 weight copies)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def _time_once(fn: Callable[[], None], device: torch.device | str) -> float:
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run(
    device: torch.device | str = "cpu",
    *,
    samples: int = 60_000,
    steps: int = 100,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    compile: bool = False,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Times every variant in every precision on ``device``: ms per training step (batch
    64) and seconds per epoch of ``samples`` random images. ``log`` gets progress lines."""
    device = torch.device(device)
    say = log or (lambda _line: None)
    gen = torch.Generator().manual_seed(0)
    images_u8 = torch.randint(0, 256, (samples, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (samples,), generator=gen)
    images = images_u8.to(device).float().div_(255).view(-1, 1, 28, 28)
    labels_d = labels.to(device)
    result = BenchResult(
        machine=hardware.describe(device),
        auto_precision=hardware.resolve_precision("auto", device),
        samples=samples,
        gemm_gflops={},
    )
    native_bf16 = result.machine["cpu_native_bf16"] if device.type == "cpu" else True
    for precision in precisions:
        say(f"GEMM rate, {precision}")
        # 1024^3 keeps an emulated bf16 product (4x slower than fp32) to a second.
        result.gemm_gflops[precision] = gemm_rate(device, precision, n=1024, rounds=3) / 1e9
    flops = epoch_flops(samples)
    variants = ["eager", *(["compile"] if compile else []), "fastmlp"]
    for precision in precisions:
        floor = flops / (result.gemm_gflops[precision] * 1e9)
        x, y = images[:BATCH], labels_d[:BATCH]
        # Where bf16 is emulated, time an eighth of the epoch (and of the steps) and
        # scale: the full epoch would take minutes.
        part = 8 if precision == "bf16" and not native_bf16 else 1
        n = samples // part
        for variant in variants:
            say(f"{variant} {precision}")
            torch.manual_seed(0)
            if variant == "fastmlp":
                step, epoch = _fastmlp_workload(device, precision, images_u8[:n], labels[:n], x, y)
            else:
                step, epoch = _eager_workload(
                    device, precision, images[:n], labels_d[:n], x, y, variant == "compile"
                )
            step_s = _time_steps(step, device, max(1, steps // part))
            epoch_s = _time_once(epoch, device) * samples / n
            result.runs.append(Run(variant, precision, step_s * 1e3, epoch_s, floor, part > 1))
    return result


def _fastmlp_workload(
    device: torch.device,
    precision: str,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """fastmlp's step on ``(x, y)`` and its epoch over the images, on a fresh model."""
    # The library (and with it the compiled extension) loads where a model runs.
    from fastmlp.nn import MLP
    from fastmlp.optim import FusedSGD

    model = MLP(SIZES).to(device)
    optimizer = FusedSGD(model, lr=LR)
    loader = DeviceLoader(images_u8, labels, BATCH, shuffle=True, device=device)

    def step() -> None:
        with autocast(device, precision):
            optimizer.train_step(x, y)

    return step, fastmlp_epoch(loader, model, optimizer, precision)


def _eager_workload(
    device: torch.device,
    precision: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    compiled: bool,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The tutorial's eager step on ``(x, y)`` and its epoch over the images, on a fresh
    model (``torch.compile``d when ``compiled``, already compiled for both batch sizes)."""
    model: nn.Module = NeuralNetwork().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    if compiled:
        compiled_model = torch.compile(model)
        assert isinstance(compiled_model, nn.Module)  # an OptimizedModule (typed as a callable)
        model = compiled_model

    def step() -> None:
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    epoch = eager_epoch(model, optimizer, images, labels, precision)
    if compiled:  # compile for the last, partial batch too
        last = len(images) % BATCH or BATCH
        eager_epoch(model, optimizer, images[:last], labels[:last], precision)()
    return step, epoch


def format_table(result: BenchResult) -> str:
    """The result as a markdown table with ratios to eager in the same precision."""
    m = result.machine
    where = (
        f"{m['gpu']} (compute capability {m['gpu_capability']})"
        if "gpu" in m
        else f"{hardware.describe_cpu(m)}, {m['threads']} threads"
    )
    rates = ", ".join(f"{p} {r:.3g} GFLOP/s" for p, r in result.gemm_gflops.items())
    eager = {r.precision: r for r in result.runs if r.variant == "eager"}
    lines = [
        f"fastmlp bench: {where}; torch {torch.__version__}",
        f"GEMM rate (1024^3 torch.mm): {rates}; precision auto picks {result.auto_precision}",
        f"epoch = {result.samples:,} samples at batch {BATCH}, tutorial MLP {SIZES}",
        "",
        "| run | precision | ms/step | s/epoch | vs eager | floor s/epoch | floor / time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result.runs:
        base = eager.get(r.precision)
        ratio = f"{base.epoch_s / r.epoch_s:.2f}x" if base else "–"
        mark = " (auto)" if r.precision == result.auto_precision else ""
        # A "floor" above the measured time is none: the large GEMM took a slower path
        # than the epoch's own (seen with emulated bf16).
        floor = (
            f"{r.floor_s:.2f} | {r.floor_s / r.epoch_s:.2f}" if r.floor_s <= r.epoch_s else "– | –"
        )
        lines.append(
            f"| {r.variant} | {r.precision}{mark} | {r.step_ms:.2f} "
            f"| {'~' if r.scaled else ''}{r.epoch_s:.2f} | {ratio} | {floor} |"
        )
    if any(r.floor_s > r.epoch_s for r in result.runs):
        lines += [
            "",
            "–: the large torch.mm ran slower than the epoch's own GEMMs, so it sets no floor.",
        ]
    if any(r.scaled for r in result.runs):
        lines += ["", "~: timed on an eighth of the epoch and scaled (bf16 is emulated here)."]
    return "\n".join(lines)
