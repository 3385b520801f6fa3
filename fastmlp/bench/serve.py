"""The serving benchmark (``fastmlp bench --serve``): CPU inference of an MLP as a service
runs it, fastmlp against eager PyTorch, ONNX Runtime and ``torch.compile``.

Two networks, fp32, under ``torch.inference_mode`` with the model in ``eval()``:

* ``tutorial``: the "Learn the Basics" MLP, 784-512-512-10 with ReLU, on (batch, 28, 28)
  images (``Flatten`` first, as the tutorial's model);
* ``narrow``: tiny-cuda-nn's shape at width 64, 32-64x4-16 with ReLU.

Two measures, as a service is judged:

* latency at batch 1 and 8: every call timed alone, p50 and p99 over all calls of all
  rounds (p99 shows the stalls: a thread hand-off, an allocation, a page fault);
* throughput at batch 64 and 4096: samples per second from the median time per call.

Variants, all with the same weights: ``eager`` (the plain ``nn.Module``), ``fastmlp``
(:class:`fastmlp.MLP`, the default path: no extra call to prepare it), ``onnxruntime``
(the plain model exported with ``torch.onnx.export``, run by an ``InferenceSession`` with
as many intra-op threads as torch uses; only when onnxruntime is installed), and with
``compile``: ``compile`` (``torch.compile``, default mode) and ``max-autotune``
(``mode="max-autotune"`` with ``torch._inductor.config.freezing = True``, the anchor for
what inductor can do with the weights fixed). Compilation and export happen in the warm-up
and are not timed; a variant that fails is recorded with its error.

Variants alternate round by round in one process, with a pause between them so that one
variant's spinning worker threads do not slow the next. The library (and so the compiled
extension) is imported only where the fastmlp model is built.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from fastmlp import hardware

__all__ = [
    "LATENCY_BATCHES",
    "MODELS",
    "THROUGHPUT_BATCHES",
    "VARIANTS",
    "ServePoint",
    "ServeResult",
    "format_markdown",
    "run",
]

#: name: layer widths (input to output).
MODELS: dict[str, tuple[int, ...]] = {
    "tutorial": (784, 512, 512, 10),
    "narrow": (32, 64, 64, 64, 64, 16),
}
LATENCY_BATCHES = (1, 8)
THROUGHPUT_BATCHES = (64, 4096)
BASE_VARIANTS = ("eager", "fastmlp", "onnxruntime")
COMPILED = {"compile": "default", "max-autotune": "max-autotune"}  # variant: compile mode
VARIANTS = (*BASE_VARIANTS, *COMPILED)
ROUNDS = 7
#: Wall time of one round of the slowest variant at a point, about; the calls per round
#: follow from the first (warm) call's time, the same count for every variant.
ROUND_S = 0.2
SEED = 0
#: Pause before each variant's round (see _time).
PAUSE_S = 0.05


@dataclass
class ServePoint:
    """One network at one batch size: per variant, microseconds per call at the 50th and
    99th percentile (latency points: over every call; throughput points: of the rounds'
    means), or why the variant could not run."""

    model: str
    batch: int
    kind: str  # "latency" or "throughput"
    calls: int = 0  # timed calls per variant and round
    p50_us: dict[str, float] = field(default_factory=dict)
    p99_us: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def samples_per_s(self, variant: str) -> float | None:
        us = self.p50_us.get(variant)
        return self.batch / (us / 1e6) if us else None

    def speedup(self, baseline: str, variant: str = "fastmlp") -> float | None:
        """``baseline``'s median time / ``variant``'s: above 1 when ``variant`` is faster."""
        if baseline not in self.p50_us or variant not in self.p50_us:
            return None
        return self.p50_us[baseline] / self.p50_us[variant]


@dataclass
class ServeResult:
    machine: dict[str, Any]
    torch_version: str
    onnxruntime_version: str | None
    rounds: int
    points: list[ServePoint] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ServeResult:
        data = json.loads(text)
        data["points"] = [ServePoint(**p) for p in data["points"]]
        return cls(**data)


# --- the models ------------------------------------------------------------------------


def plain_model(sizes: Sequence[int]) -> nn.Sequential:
    """``Flatten`` (for the tutorial's images), then ``nn.Linear`` + ``nn.ReLU`` layers, no
    activation after the last: what a user serves without fastmlp."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def example_input(model: str, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    shape = (batch, 28, 28) if model == "tutorial" else (batch, MODELS[model][0])
    return torch.randn(shape, generator=gen)


def _plain(sizes: Sequence[int]) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return plain_model(sizes).eval()


@contextlib.contextmanager
def _freezing() -> Iterator[None]:
    import torch._inductor.config as inductor_config

    before = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = before


def _export(plain: nn.Module, x: torch.Tensor, buffer: io.BytesIO) -> None:
    torch.onnx.export(
        plain,
        (x,),
        cast(Any, buffer),  # a file object works; the annotation says path
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        dynamo=False,
    )


def _onnxruntime_call(plain: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        _export(plain, x, buffer)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def make_call(variant: str, model: str, x: torch.Tensor) -> Callable[[], Any]:
    """One inference call of ``variant`` on ``x``, as a service would make it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    sizes = MODELS[model]
    plain = _plain(sizes)
    if variant == "onnxruntime":
        return _onnxruntime_call(plain, x)
    if variant == "fastmlp":
        from fastmlp.nn import MLP  # the library loads where a fastmlp model runs

        fused = MLP(sizes).eval()
        plain_linears = [m for m in plain if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for ours, theirs in zip(fused.linears(), plain_linears, strict=True):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
        module: Callable[[torch.Tensor], torch.Tensor] = fused
    elif variant in COMPILED:
        module = torch.compile(plain, mode=COMPILED[variant])
    else:
        module = plain

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    if variant == "max-autotune":

        def frozen_call() -> torch.Tensor:
            with _freezing():
                return call()

        return frozen_call
    return call


# --- timing ----------------------------------------------------------------------------


def _error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _prepare(point: ServePoint, variants: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """Each variant's call, warmed up; a variant other than eager and fastmlp that fails
    (an export, a compile) goes into ``point.errors``."""
    x = example_input(point.model, point.batch)
    calls = {}
    for variant in variants:
        try:
            call = make_call(variant, point.model, x)
            for _ in range(3):
                call()
        except Exception as e:  # noqa: BLE001  (record it, go on with the others)
            if variant in ("eager", "fastmlp"):
                raise
            point.errors[variant] = _error_text(e)
            continue
        calls[variant] = call
    return calls


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _time(
    point: ServePoint, calls: dict[str, Callable[[], Any]], rounds: int, round_s: float
) -> None:
    slowest = 0.0
    for call in calls.values():
        start = time.perf_counter()
        call()
        slowest = max(slowest, time.perf_counter() - start)
    point.calls = max(1, min(5000, round(round_s / max(slowest, 1e-7))))
    each: dict[str, list[float]] = {v: [] for v in calls}  # every call (latency)
    means: dict[str, list[float]] = {v: [] for v in calls}  # per round (throughput)
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for variant, call in calls.items():
            # Let the last variant's worker threads go to sleep first: ONNX Runtime's and
            # OpenMP's spin for a while after each call, and on a 2-core machine a spinning
            # thread halves the next variant's speed (measured: 2x at batch 1).
            time.sleep(PAUSE_S)
            times = each[variant]
            begin = clock()
            for _ in range(point.calls):
                start = clock()
                call()
                times.append((clock() - start) / 1e3)
            means[variant].append((clock() - begin) / 1e3 / point.calls)
    source = each if point.kind == "latency" else means
    for variant, values in source.items():
        point.p50_us[variant] = statistics.median(values)
        point.p99_us[variant] = _percentile(values, 99)


def default_variants(compile: bool = False) -> tuple[str, ...]:
    """eager and fastmlp; onnxruntime where it is installed; the compiled ones if asked."""
    variants = ["eager", "fastmlp"]
    if importlib.util.find_spec("onnxruntime") is not None:
        variants.append("onnxruntime")
    return (*variants, *(COMPILED if compile else ()))


def run(
    models: Sequence[str] = tuple(MODELS),
    variants: Sequence[str] | None = None,
    *,
    latency_batches: Sequence[int] = LATENCY_BATCHES,
    throughput_batches: Sequence[int] = THROUGHPUT_BATCHES,
    rounds: int = ROUNDS,
    round_s: float = ROUND_S,
    log: Callable[[str], None] | None = None,
) -> ServeResult:
    """Times ``variants`` (default: :func:`default_variants`) on each network and batch."""
    variants = default_variants() if variants is None else tuple(variants)
    for name, allowed in (("model", MODELS), ("variant", VARIANTS)):
        chosen = models if name == "model" else variants
        bad = [c for c in chosen if c not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad[0]!r}; choose from {', '.join(allowed)}")
    ort_version = None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        ort_version = onnxruntime.__version__
    result = ServeResult(hardware.describe("cpu"), torch.__version__, ort_version, rounds)
    plan = [(b, "latency") for b in latency_batches] + [
        (b, "throughput") for b in throughput_batches
    ]
    for model in models:
        for batch, kind in plan:
            point = ServePoint(model, batch, kind)
            torch._dynamo.reset()  # each point compiles afresh
            _time(point, _prepare(point, variants), rounds, round_s)
            gc.collect()  # the point's sessions and models (and their threads) go now
            result.points.append(point)
            if log is not None:
                log(f"{model} batch {batch}: " + _summary(point))
    return result


def _summary(p: ServePoint) -> str:
    parts = [f"{v} {us:.4g} us" for v, us in p.p50_us.items()]
    return ", ".join(parts + [f"{v} failed" for v in p.errors])


# --- the table -------------------------------------------------------------------------


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, fmt) + suffix


def format_markdown(result: ServeResult) -> str:
    """Latency rows (p50 / p99 microseconds) and throughput rows (samples per second),
    then fastmlp's speed-up over each other variant (their median time / fastmlp's)."""
    m = result.machine
    variants = [v for v in VARIANTS if any(v in p.p50_us or v in p.errors for p in result.points)]
    others = [v for v in variants if v != "fastmlp"]
    ort = f", onnxruntime {result.onnxruntime_version}" if result.onnxruntime_version else ""
    header = ["network", "batch", "measure", *variants, *(f"vs {v}" for v in others)]
    lines = [
        f"Serving: {hardware.describe_cpu(m)}, {m['threads']} threads; torch "
        f"{result.torch_version}{ort}; fp32, inference_mode, {result.rounds} interleaved rounds",
        "latency: p50 / p99 us per call over every call; throughput: samples/s from the "
        "median call; vs X = X's median time / fastmlp's",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|---|" + "---:|" * (len(header) - 3),
    ]
    for p in result.points:
        cells = [p.model, str(p.batch), "p50 / p99 us" if p.kind == "latency" else "samples/s"]
        for v in variants:
            if v in p.errors:
                cells.append("failed")
            elif p.kind == "latency":
                cells.append(f"{_cell(p.p50_us.get(v), '.4g')} / {_cell(p.p99_us.get(v), '.4g')}")
            else:
                cells.append(_cell(p.samples_per_s(v), ",.0f"))
        cells += [_cell(p.speedup(v), ".2f", "x") for v in others]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(p, v, e) for p in result.points for v, e in p.errors.items()]
    if failed:
        lines += ["", "Failed:"] + [f"- {p.model} batch {p.batch}, {v}: {e}" for p, v, e in failed]
    return "\n".join(lines)
