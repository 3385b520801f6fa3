"""The shape-grid benchmark (``fastmlp bench --grid``): fastmlp's CPU MLP against eager
PyTorch and ``torch.compile`` at the network shapes users of fused-MLP libraries bring.

The network is tiny-cuda-nn's standard shape: 32 inputs, ``depth`` hidden layers of
``width`` units with ReLU, 16 outputs, biases on. The grid (issue 24): widths
32/64/128/256/512/1024, 2/4/8 hidden layers, batch 1/16/256/4096/65536, fp32 and bf16
(bf16 only where the CPU computes it natively), in three modes:

* ``train``: a user's step, ``opt.zero_grad(set_to_none=True); loss =
  model(x).float().square().mean(); loss.backward(); opt.step()`` with
  ``torch.optim.SGD(lr=1e-3)``; bf16 runs forward and loss under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` with fp32 weights;
* ``no_grad`` and ``inference_mode``: the forward under that context (bf16 under autocast).

Variants, all starting from the same weights so they compute the same function:
``eager`` (a plain ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU``), ``compile``
(``torch.compile`` of it, default mode), ``fastmlp`` (:class:`fastmlp.MLP`) and, at the
shapes chosen as anchors, ``max-autotune`` (``torch.compile(mode="max-autotune")``).
Compilation happens in the warm-up and is not timed; a variant that fails to compile is
recorded with its error and the grid goes on.

At each point the variants alternate round by round in one process: ``rounds`` rounds of
the same number of steps each, enough that the fastest variant's round takes
``min_round_s``; the result is the median ms per step. Points whose step is more work than
``max_gflop`` (or bf16 on a CPU without native bf16) are reported as skipped, with the
reason (:func:`why_none_timed` says when every point would be: the command refuses that).
The library (and so the compiled extension) is imported only where a fastmlp model is
built.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fastmlp import hardware

__all__ = [
    "BATCHES",
    "DEPTHS",
    "DTYPES",
    "MODES",
    "VARIANTS",
    "WIDTHS",
    "GridResult",
    "Point",
    "PointResult",
    "build_model",
    "format_markdown",
    "grid",
    "initial_state",
    "make_step",
    "parse_anchors",
    "run",
    "skip_reason",
    "why_none_timed",
]

WIDTHS = (32, 64, 128, 256, 512, 1024)
DEPTHS = (2, 4, 8)
BATCHES = (1, 16, 256, 4096, 65536)
DTYPES = ("fp32", "bf16")
MODES = ("train", "no_grad", "inference_mode")
VARIANTS = ("eager", "compile", "fastmlp")  # the default ones
ANCHOR_VARIANT = "max-autotune"
ALL_VARIANTS = (*VARIANTS, ANCHOR_VARIANT)
COMPILED = {"compile": "default", ANCHOR_VARIANT: "max-autotune"}  # variant: compile mode
IN_FEATURES = 32
OUT_FEATURES = 16
LR = 1e-3
# The biggest step timed by default: about 1 s on 2 cores of an AVX-512 EPYC in fp32
# (~150 GFLOP/s at these shapes), so no single step takes more than a few seconds.
MAX_GFLOP = 100.0
ROUNDS = 5
MIN_ROUND_S = 0.02
SEED = 0


@dataclass(frozen=True)
class Point:
    """One shape, dtype and mode of the grid."""

    width: int
    depth: int  # hidden layers
    batch: int
    dtype: str  # fp32 | bf16
    mode: str  # train | no_grad | inference_mode

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths from input to output: ``(32, width, ..., width, 16)``."""
        return (IN_FEATURES, *([self.width] * self.depth), OUT_FEATURES)

    @property
    def shape(self) -> str:
        """``WIDTHxDEPTHxBATCH``, as ``--anchors`` names a shape."""
        return f"{self.width}x{self.depth}x{self.batch}"

    def gflop(self) -> float:
        """GFLOP of one step: the forward's GEMMs; training adds the weight gradients and
        the input gradients of every layer but the first (the input needs none)."""
        pairs = list(zip(self.sizes[:-1], self.sizes[1:], strict=False))
        forward = sum(i * o for i, o in pairs)
        if self.mode == "train":
            forward = 2 * forward + sum(i * o for i, o in pairs[1:])
        return 2 * self.batch * forward / 1e9


def grid(
    widths: Iterable[int] = WIDTHS,
    depths: Iterable[int] = DEPTHS,
    batches: Iterable[int] = BATCHES,
    dtypes: Iterable[str] = DTYPES,
    modes: Iterable[str] = MODES,
) -> list[Point]:
    """Every combination, dtype and mode outermost and batch innermost (the table's order)."""
    for name, values, allowed in (("dtype", dtypes, DTYPES), ("mode", modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad[0]!r}; choose from {', '.join(allowed)}")
    for name, numbers in (("width", widths), ("depth", depths), ("batch", batches)):
        wrong = [v for v in numbers if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if wrong:
            raise ValueError(f"{name} must be a positive integer, got {wrong[0]!r}")
    return [
        Point(w, d, b, dt, m)
        for dt in dtypes
        for m in modes
        for w in widths
        for d in depths
        for b in batches
    ]


def skip_reason(point: Point, max_gflop: float = MAX_GFLOP) -> str | None:
    """Why ``point`` is not timed here (``None``: it is)."""
    if point.dtype == "bf16" and not hardware.cpu_has_native_bf16():
        return (
            f"bf16 is not native on this CPU ({hardware.cpu_info().model}: no AVX512-BF16 or AMX)"
        )
    if point.gflop() > max_gflop:
        return f"{point.gflop():.3g} GFLOP per step, over the cap of {max_gflop:g} (--max-gflop)"
    return None


def why_none_timed(points: Sequence[Point], max_gflop: float = MAX_GFLOP) -> str | None:
    """``None`` when :func:`run` would time at least one of ``points``, else why it would
    time none: every point is skipped, with the first one's reason."""
    reasons = [skip_reason(p, max_gflop) for p in points]
    if not points or not all(reasons):
        return None
    return f"all {len(points)} selected points are skipped, e.g. {_label(points[0])}: {reasons[0]}"


def parse_anchors(text: str) -> tuple[str, ...]:
    """``"64x4x4096,128x4x65536"`` -> the shapes (``WIDTHxDEPTHxBATCH``) to time
    ``max-autotune`` at too."""
    shapes = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        parts = word.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"anchor {word!r} is not WIDTHxDEPTHxBATCH (e.g. 64x4x4096)")
        shapes.append("x".join(str(int(p)) for p in parts))
    return tuple(shapes)


# --- the models and their steps ----------------------------------------------------------


def plain_mlp(sizes: Sequence[int]) -> nn.Sequential:
    """``nn.Sequential`` of ``nn.Linear`` + ``nn.ReLU``, no activation after the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def initial_state(sizes: Sequence[int], seed: int = SEED) -> dict[str, torch.Tensor]:
    """The weights every variant starts from (``nn.Linear``'s initialisation, seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return plain_mlp(sizes).state_dict()


def build_model(variant: str, sizes: Sequence[int], state: dict[str, torch.Tensor]) -> nn.Module:
    """The ``variant``'s model with a copy of the weights ``state`` (a plain stack's keys)."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(ALL_VARIANTS)}")
    if variant == "fastmlp":
        from fastmlp.nn import MLP  # the library loads where a fastmlp model runs

        model = MLP(sizes)
        model.linear_relu_stack.load_state_dict(state)
        return model
    plain = plain_mlp(sizes)
    plain.load_state_dict(state)
    if variant in COMPILED:
        compiled = torch.compile(plain, mode=COMPILED[variant])
        assert isinstance(compiled, nn.Module)  # an OptimizedModule (typed as a callable)
        return compiled
    return plain


def _autocast(dtype: str) -> contextlib.AbstractContextManager[Any]:
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(model: nn.Module, x: torch.Tensor, point: Point) -> Callable[[], torch.Tensor]:
    """One step of ``point.mode`` on ``model``; returns the loss (train) or the output."""
    if point.mode == "train":
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def train() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with _autocast(point.dtype):
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            return loss

        return train
    context = torch.no_grad if point.mode == "no_grad" else torch.inference_mode

    def infer() -> torch.Tensor:
        with context(), _autocast(point.dtype):
            return model(x)

    return infer


def example_input(point: Point) -> torch.Tensor:
    """The point's random fp32 input (autocast converts it for bf16)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(point.batch, IN_FEATURES, generator=gen)


# --- timing --------------------------------------------------------------------------------


@dataclass
class PointResult:
    """A grid point's median ms per step by variant, or why it was skipped."""

    width: int
    depth: int
    batch: int
    dtype: str
    mode: str
    gflop: float
    skipped: str | None = None  # the reason, when the point was not timed
    ms: dict[str, float] = field(default_factory=dict)  # variant: median ms per step
    errors: dict[str, str] = field(default_factory=dict)  # variant: why it could not run
    steps_per_round: int = 0

    @property
    def point(self) -> Point:
        return Point(self.width, self.depth, self.batch, self.dtype, self.mode)

    def samples_per_s(self, variant: str) -> float | None:
        ms = self.ms.get(variant)
        return self.batch / (ms / 1e3) if ms else None

    def speedup(self, baseline: str, variant: str = "fastmlp") -> float | None:
        """``baseline``'s time / ``variant``'s: above 1 when ``variant`` is faster."""
        if baseline not in self.ms or variant not in self.ms:
            return None
        return self.ms[baseline] / self.ms[variant]


@dataclass
class GridResult:
    machine: dict[str, Any]
    torch_version: str
    rounds: int
    min_round_s: float
    max_gflop: float
    points: list[PointResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> GridResult:
        data = json.loads(text)
        data["points"] = [PointResult(**p) for p in data["points"]]
        return cls(**data)


def _error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _prepare(
    point: Point, variants: Sequence[str], result: PointResult
) -> dict[str, Callable[[], torch.Tensor]]:
    """Each variant's step, warmed up (torch.compile compiles here); a compiled variant
    that fails goes into ``result.errors`` instead."""
    state = initial_state(point.sizes)
    x = example_input(point)
    steps = {}
    for variant in variants:
        try:
            step = make_step(build_model(variant, point.sizes, state), x, point)
            step()
            step()
        except Exception as e:  # noqa: BLE001  (any compile failure: record it, go on)
            if variant not in COMPILED:
                raise
            result.errors[variant] = _error_text(e)
            continue
        steps[variant] = step
    return steps


def _time_interleaved(
    steps: dict[str, Callable[[], torch.Tensor]], rounds: int, min_round_s: float
) -> tuple[dict[str, float], int]:
    """Median ms per step of each step function, alternating round by round; and the
    steps per round (the same for all, enough for the fastest to take ``min_round_s``)."""
    fastest = math.inf
    for step in steps.values():
        start = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - start)
    inner = max(1, math.ceil(min_round_s / max(fastest, 1e-9)))
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            times[variant].append((time.perf_counter() - start) / inner * 1e3)
    return {v: statistics.median(t) for v, t in times.items()}, inner


def time_point(
    point: Point,
    variants: Sequence[str],
    rounds: int = ROUNDS,
    min_round_s: float = MIN_ROUND_S,
    max_gflop: float = MAX_GFLOP,
) -> PointResult:
    """Times ``variants`` at ``point`` (or records why it is skipped)."""
    p = point
    result = PointResult(p.width, p.depth, p.batch, p.dtype, p.mode, round(p.gflop(), 6))
    result.skipped = skip_reason(point, max_gflop)
    if result.skipped is not None:
        return result
    torch._dynamo.reset()  # each point compiles afresh: no recompile limit, no stale graphs
    steps = _prepare(point, variants, result)
    if steps:
        result.ms, result.steps_per_round = _time_interleaved(steps, rounds, min_round_s)
    return result


def run(
    points: Sequence[Point],
    variants: Sequence[str] = VARIANTS,
    *,
    anchors: Iterable[str] = (),
    rounds: int = ROUNDS,
    min_round_s: float = MIN_ROUND_S,
    max_gflop: float = MAX_GFLOP,
    log: Callable[[str], None] | None = None,
) -> GridResult:
    """Times every point of ``points``; ``max-autotune`` also at the ``anchors`` shapes
    (``WIDTHxDEPTHxBATCH``, each one of the points). ``log`` gets a line per point."""
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        raise ValueError(f"unknown variant {bad[0]!r}; choose from {', '.join(ALL_VARIANTS)}")
    anchors = set(anchors)
    missing = sorted(anchors - {p.shape for p in points})
    if missing:
        raise ValueError(f"anchor {missing[0]} is not a shape of the selected grid")
    result = GridResult(hardware.describe("cpu"), torch.__version__, rounds, min_round_s, max_gflop)
    for i, point in enumerate(points, 1):
        extra = (
            [ANCHOR_VARIANT] if point.shape in anchors and ANCHOR_VARIANT not in variants else []
        )
        r = time_point(point, [*variants, *extra], rounds, min_round_s, max_gflop)
        result.points.append(r)
        if log is not None:
            what = f"skipped: {r.skipped}" if r.skipped else _ms_text(r)
            log(f"[{i}/{len(points)}] {_label(point)}: {what}")
    return result


def _label(p: Point) -> str:
    return f"{p.dtype} {p.mode} width {p.width} depth {p.depth} batch {p.batch}"


def _ms_text(r: PointResult) -> str:
    parts = [f"{v} {ms:.3g} ms" for v, ms in r.ms.items()]
    parts += [f"{v} failed" for v in r.errors]
    return ", ".join(parts)


# --- the table -------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def format_markdown(result: GridResult) -> str:
    """The grid as a Markdown table for the README: the CPU and torch version first, then
    a row per timed point, then the skipped points and failed variants with the reasons.
    When no point was timed, a line that says so takes the table's place."""
    m = result.machine
    timed = [r for r in result.points if r.skipped is None]
    variants = [v for v in ALL_VARIANTS if any(v in r.ms or v in r.errors for r in timed)]
    header = ["dtype", "mode", "width", "depth", "batch", *(f"{v} ms" for v in variants)]
    header += ["fastmlp samples/s", "vs eager", "vs compile"]
    lines = [
        f"Shape grid: {hardware.describe_cpu(m)}, {m['threads']} threads; "
        f"torch {result.torch_version}",
        f"net {IN_FEATURES} -> width x depth -> {OUT_FEATURES}, ReLU, biases; median ms per "
        f"step of {result.rounds} interleaved rounds (each >= {result.min_round_s * 1e3:g} ms); "
        "speed-up = other's time / fastmlp's",
        "",
    ]
    if timed:
        lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    else:
        n = len(result.points)
        why = f"all {n} selected points were skipped (below)" if n else "no point was selected"
        lines.append(f"No point was timed: {why}.")
    for r in timed:
        cells = [r.dtype, r.mode, str(r.width), str(r.depth), str(r.batch)]
        cells += ["failed" if v in r.errors else _cell(r.ms.get(v), ".3g") for v in variants]
        cells.append(_cell(r.samples_per_s("fastmlp"), ",.0f"))
        cells += [_cell(r.speedup(b), ".2f") + ("x" if r.speedup(b) else "") for b in VARIANTS[:2]]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in result.points if r.skipped is not None]
    if skipped:
        lines += ["", f"Skipped ({len(skipped)} points):"]
        lines += [f"- {_label(r.point)}: {r.skipped}" for r in skipped]
    failed = [(r, v, e) for r in timed for v, e in r.errors.items()]
    if failed:
        lines += ["", "Failed:"] + [f"- {_label(r.point)}, {v}: {e}" for r, v, e in failed]
    return "\n".join(lines)
