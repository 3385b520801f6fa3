"""What a training run computes: :class:`TrainConfig`, its presets, and what a resume may change.

Every field of :class:`TrainConfig` carries its help text, the values it accepts (choices or a
:class:`Range`) and how the command line spells it (:func:`option`). The config validates itself
with them and ``fastmlp train`` generates its flags from them (:data:`OPTIONS`, read by
:mod:`fastmlp.workflow.cli`), so the Python API and the command line accept the same values.

:data:`PRESETS` are named starting points (``fastmlp train --preset NAME``,
:meth:`TrainConfig.from_preset`); :func:`resume_config` is the one rule for what a resumed run
takes from its checkpoint and what from the caller.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fastmlp import hardware
from fastmlp.workflow import distributed
from fastmlp.workflow.data import CLASSES, IMAGE_SIZE, TRAIN_SIZE

__all__ = [
    "MAX_WIDTH",
    "OPTIONS",
    "PRESETS",
    "RESUME_MAY_CHANGE",
    "Option",
    "Range",
    "TrainConfig",
    "option",
    "resume_config",
    "resume_ignores",
]

INPUTS = IMAGE_SIZE * IMAGE_SIZE  # the MLP's first width: one input per pixel
OUTPUTS = len(CLASSES)  # its last: one logit per class

#: Named starting points: each fills in the fields it names, over the documented recipe
#: (TrainConfig's defaults); flags or overrides given with it win. One entry per preset.
PRESETS: dict[str, dict[str, Any]] = {
    # The "Learn the Basics" tutorial's own hyperparameters: plain SGD, nothing added.
    "tutorial": dict(
        optimizer="sgd",
        lr=1e-3,
        momentum=0.0,
        nesterov=False,
        batch_size=64,
        epochs=10,
        schedule="none",
        label_smoothing=0.0,
        weight_decay=0.0,
        augment=False,
        precision="fp32",
    ),
    # The speedrun: 90% test accuracy in 5 epochs (~7 s of training on 2 CPU cores, fp32).
    # Whitened inputs are the lever (+0.8-1 point at 6 epochs over raw pixels), and they
    # take a higher peak rate; flips cost accuracy in runs this short. docs/benchmarks.md has
    # the sweep and the 5-seed table.
    "fast": dict(epochs=5, lr=0.4, whiten=True, augment=False, precision="fp32"),
}


@dataclass(frozen=True)
class Range:
    """The numbers from ``low`` to ``high`` (``math.inf``: no upper end); each end is
    included unless it is open."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        # NaN fails both comparisons, so it is never inside.
        above = value > self.low if self.low_open else value >= self.low
        if self.high == math.inf:
            return bool(above)
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)

    def describe(self) -> str:
        """``>= 1``, ``between 0 and 27``, ``in (0, 10)``: how an error states it."""
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if not (self.low_open or self.high_open):
            return f"between {self.low} and {self.high}"
        return f"in {self.interval()}"

    def interval(self) -> str:
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{lo}{self.low}, {self.high}{hi}"


def option(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] | None = None,
    range: Range | None = None,
    unit: str | None = None,
    what: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    check: Callable[[Any], str | None] | None = None,
    cli: bool = True,
) -> Any:
    """A :class:`TrainConfig` field with what validation and the command line need.

    ``help`` is the flag's help; ``{default}`` in it becomes the default as the command line
    writes it. ``choices`` or ``range`` are the accepted values, ``unit`` their unit in
    messages, ``what`` the field's name in messages (default: its name with spaces), ``check``
    any further rule (value to the reason it is refused, or ``None``); the config and its
    flag both apply them. ``flag`` (default ``--field-name``), ``metavar``, ``parse`` (text
    to value; raises ``ValueError`` with the message) and ``show`` (value to text) shape the
    flag; ``cli=False`` keeps the field off the command line.
    """
    spec = dict(
        help=help,
        choices=tuple(choices) if choices is not None else None,
        range=range,
        unit=unit,
        what=what,
        flag=flag,
        metavar=metavar,
        parse=parse,
        show=show,
        check=check,
        cli=cli,
    )
    return field(default=default, metadata={"option": spec})


#: The widest hidden layer a config accepts: 2**24. Two such layers in a row hold 2**48
#: weights (1 PiB in fp32), so every layer's size stays far inside int64 and what does not
#: fit in memory fails as a memory error naming the layer (train.build_model), not as an
#: overflow deep inside PyTorch.
MAX_WIDTH = 2**24


def _sizes_problem(sizes: tuple[int, ...]) -> str | None:
    """Why ``sizes`` are not the layer widths of a Fashion-MNIST MLP, or ``None``: the one
    check of both ``TrainConfig.sizes`` and ``--hidden``."""
    if len(sizes) < 2:
        return f"bad layer sizes {sizes}"
    if sizes[0] != INPUTS or sizes[-1] != OUTPUTS:
        return (
            f"layer sizes must run from {INPUTS} inputs ({IMAGE_SIZE}x{IMAGE_SIZE} pixels) "
            f"to {OUTPUTS} outputs (the Fashion-MNIST classes), got {sizes}"
        )
    for width in sizes[1:-1]:
        if width < 1:
            return f"hidden layer widths must be positive, got {width}"
        if width > MAX_WIDTH:
            return (
                f"hidden layer widths must be at most {MAX_WIDTH} (2**24: two such layers "
                f"hold 2**48 weights, 1 PiB in fp32), got {width}"
            )
    return None


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        hidden = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"expected widths like 512,512, got {text!r}") from None
    if not hidden:
        raise ValueError(f"expected positive widths like 512,512, got {text!r}")
    sizes = (INPUTS, *hidden, OUTPUTS)
    problem = _sizes_problem(sizes)
    if problem is not None:
        raise ValueError(f"{problem} (in {text!r})" if len(hidden) > 1 else problem)
    return sizes


def _show_hidden(sizes: tuple[int, ...]) -> str:
    return ",".join(str(s) for s in sizes[1:-1])


@dataclass
class TrainConfig:
    """One experiment. The defaults are what ``fastmlp train`` runs: the documented recipe
    (40 epochs; ``epochs=120`` is the most accurate found). The ``"fast"`` preset reaches
    90% in 5 epochs. The default precision is ``"auto"`` because bf16 is fast only where
    the hardware computes it natively. Accuracies, timings and the sweeps behind these
    choices: docs/benchmarks.md.

    Each field's help (``fastmlp train --help``) and accepted values are in its
    :func:`option`; :data:`OPTIONS` lists them.
    """

    epochs: int = option(
        40,
        "passes over the training data (default {default}); with --resume: continue the run "
        "to this many epochs in total (a cosine/onecycle schedule is laid out again over the "
        "new total)",
        range=Range(1),
    )
    batch_size: int = option(
        256,
        "samples per step and process; under torchrun the global batch is this times the "
        "number of processes (default {default})",
        range=Range(1),
    )
    optimizer: str = option(
        "sgd",
        "SGD, Adam or AdamW, each a fused one-kernel step on the CPU (default {default})",
        choices=("sgd", "adam", "adamw"),
    )
    # Below 10: the range --lr has always had, now the config's too (one range per field).
    lr: float = option(
        0.1,
        "peak learning rate (one-cycle) or initial rate (cosine, none), default {default}",
        range=Range(0, 10, low_open=True, high_open=True),
        what="learning rate",
    )
    momentum: float = option(
        0.9,
        "SGD momentum; one-cycle cycles it between 0.85 and 0.95 (default {default})",
        range=Range(0, 1, high_open=True),
    )
    nesterov: bool = option(True, "Nesterov momentum for SGD (default {default})")
    weight_decay: float = option(
        2e-4,
        "L2 coefficient, decoupled for AdamW (default {default})",
        range=Range(0, 1, high_open=True),
    )
    schedule: str = option(
        "onecycle",
        "learning-rate schedule, stepped per batch (default {default})",
        choices=("none", "onecycle", "cosine"),
    )
    warmup: float = option(
        0.25,
        "one-cycle warm-up fraction of all steps (default {default})",
        range=Range(0, 1, low_open=True, high_open=True),
    )
    label_smoothing: float = option(
        0.1,
        "label smoothing of the cross-entropy loss (default {default})",
        range=Range(0, 1, high_open=True),
    )
    augment: bool = option(True, "random horizontal flip, plus --max-shift (default {default})")
    max_shift: int = option(
        0,
        "random shift in pixels under --augment (default {default})",
        range=Range(0, IMAGE_SIZE - 1),  # a shift must leave part of the image
        unit="pixels",
        metavar="PX",
    )
    whiten: bool = option(
        False,
        "train on ZCA-whitened pixels (decorrelated, unit variance), estimated from the "
        "training images; the saved model still takes raw pixels: the whitening is folded "
        "into its first layer (default {default})",
    )
    precision: str = option(
        "auto",
        "default {default}: bf16 where the CPU (AVX512-BF16/AMX) or GPU computes it natively, "
        "else fp32; bf16 elsewhere is emulated and several times slower (bf16 is autocast: "
        "the master weights stay fp32; the test-set evaluation after each epoch is fp32 "
        "whatever trains, so it is what the saved checkpoint scores)",
        choices=hardware.TRAIN_PRECISIONS,
    )
    device: str = option("auto", "auto (GPU if present), cpu, cuda or cuda:N (default {default})")
    seed: int = option(
        0,
        "seed of the initial weights, the shuffling and the augmentation (default {default})",
        range=Range(0, 2**64 - 1),  # what torch.manual_seed accepts as a non-negative seed
    )
    sizes: tuple[int, ...] = option(
        (INPUTS, 512, 512, OUTPUTS),
        f"hidden layer widths, each from 1 to {MAX_WIDTH} (default {{default}})",
        flag="--hidden",
        metavar="W,W",
        parse=_parse_hidden,
        show=_show_hidden,
        check=_sizes_problem,
    )
    eval_batch_size: int = option(2000, "samples per evaluation batch", range=Range(1), cli=False)
    data: str | None = option(
        None,
        "folder with the Fashion-MNIST IDX files (default: $FASTMLP_DATA if set, else "
        "~/.cache/fastmlp or /usr/share/datasets/fashion-mnist)",
        metavar="DIR",
    )
    train_samples: int | None = option(
        None,
        f"train on the first N images only (quick checks; default: all {TRAIN_SIZE})",
        range=Range(1),
        metavar="N",
    )
    backend: str = option(
        "auto",
        "process-group backend under torchrun: auto is nccl on CUDA, gloo on the CPU "
        "(default {default}; unused in a single process)",
        choices=distributed.BACKENDS,
    )
    # Cross-entropy over 10 classes starts near 2.3.
    max_loss: float | None = option(
        100.0,
        "stop as diverged when an epoch's mean train loss exceeds X; NaN/inf always stop the "
        "run; 'none': no limit (default {default})",
        range=Range(0, low_open=True),
        metavar="X",
    )
    # A record, not a setting: from_preset sets it so that metrics.json and the checkpoint
    # say where the config came from. Not checked against PRESETS, so a run made with a
    # preset that is later renamed still resumes.
    preset: str | None = option(
        None, "the preset this config started from (from_preset); None: the recipe", cli=False
    )

    def __post_init__(self) -> None:
        self.sizes = tuple(int(s) for s in self.sizes)
        for opt in OPTIONS:
            problem = opt.check(getattr(self, opt.name))
            if problem is not None:
                raise ValueError(problem)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from :func:`dataclasses.asdict` output, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The documented recipe with :data:`PRESETS` ``[name]`` filled in, then
        ``overrides``; ``preset`` records ``name``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides, "preset": name})


@dataclass(frozen=True)
class Option:
    """One :class:`TrainConfig` field as its :func:`option` describes it, with its type."""

    name: str
    default: Any
    kind: type  # int, float, bool, str or tuple
    optional: bool  # None is a valid value
    help: str
    choices: tuple[str, ...] | None
    range: Range | None
    unit: str | None
    what: str  # the field in error messages
    flag: str | None  # None: not on the command line
    metavar: str | None
    parse: Callable[[str], Any] | None
    show: Callable[[Any], str] | None
    validate: Callable[[Any], str | None] | None  # a check of its own (the layer sizes)

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this field, or ``None`` when it is."""
        if value is None:
            return None if self.optional else f"{self.what} must be given, got None"
        if self.validate is not None:
            problem = self.validate(value)
            if problem is not None:
                return problem
        if self.choices is not None and value not in self.choices:
            return f"unknown {self.what} {value!r} (choose from {', '.join(self.choices)})"
        if self.range is not None and value not in self.range:
            unit = f" {self.unit}" if self.unit else ""
            none = " (or None)" if self.optional else ""
            return f"{self.what} must be {self.range.describe()}{unit}{none}, got {value}"
        return None

    def text(self, value: Any) -> str:
        """``value`` as the command line writes it (``0.0002``, ``512,512``, ``none``)."""
        if value is None:
            return "none"
        if self.show is not None:
            return self.show(value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def help_text(self) -> str:
        return self.help.replace("{default}", self.text(self.default))


def _options(cls: type) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        spec = f.metadata["option"]
        hint = hints[f.name]
        optional = type(None) in typing.get_args(hint)  # X | None
        if optional:
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        kind = typing.get_origin(hint) or hint  # tuple[int, ...] -> tuple
        flag = (spec["flag"] or "--" + f.name.replace("_", "-")) if spec["cli"] else None
        out.append(
            Option(
                name=f.name,
                default=f.default,
                kind=kind,
                optional=optional,
                help=spec["help"],
                choices=spec["choices"],
                range=spec["range"],
                unit=spec["unit"],
                what=spec["what"] or f.name.replace("_", " "),
                flag=flag,
                metavar=spec["metavar"],
                parse=spec["parse"],
                show=spec["show"],
                validate=spec["check"],
            )
        )
    return tuple(out)


#: Every TrainConfig field's option, in field order: what the config validates and the
#: command line offers.
OPTIONS: tuple[Option, ...] = _options(TrainConfig)

#: What a resumed run takes from the caller: where it runs, not what it computes. Every
#: other setting comes from the checkpoint; ``epochs`` can only extend the run.
RESUME_MAY_CHANGE: tuple[str, ...] = ("device", "data", "backend")


def resume_ignores(given: Iterable[str]) -> list[str]:
    """The field names among ``given`` that a resume ignores, sorted."""
    return sorted(set(given) - {*RESUME_MAY_CHANGE, "epochs"})


def resume_config(
    saved: TrainConfig,
    given: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    *,
    done: int = 0,
    source: str = "the checkpoint",
) -> TrainConfig:
    """The config a run resumed from ``source`` uses: ``saved``, with the ``given`` values of
    :data:`RESUME_MAY_CHANGE` that are not ``None`` (other ``given`` keys are ignored:
    :func:`resume_ignores`), and ``epochs`` as the new total when given. ``done`` epochs are
    trained already; fewer ``epochs`` than that is an error."""
    changes = {k: v for k, v in (given or {}).items() if k in RESUME_MAY_CHANGE and v is not None}
    if epochs is not None:
        if epochs < done:
            raise ValueError(
                f"{source} has already trained {done} epochs, more than --epochs {epochs}; "
                f"pass --epochs {done + 1} or more to continue it"
            )
        changes["epochs"] = epochs
    return dataclasses.replace(saved, **changes)
