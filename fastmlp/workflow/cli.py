"""The ``fastmlp`` command: train, evaluate, predict, samples, bench.

A thin shell over :mod:`fastmlp.workflow.train`, :mod:`fastmlp.workflow.checkpoint`,
:mod:`fastmlp.workflow.data` and :mod:`fastmlp.bench`. Every failure a user can cause (a
bad flag or value, missing data, a damaged or unsafe checkpoint, an unreadable image) ends
in a short ``fastmlp …: error: …`` message on stderr and a non-zero exit status, never a
traceback (set ``FASTMLP_DEBUG=1`` to get one).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from fastmlp import activations, hardware
from fastmlp.bench import grid
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import data, distributed, rundir
from fastmlp.workflow.config import OPTIONS, PRESETS, Option, Range
from fastmlp.workflow.loader import DeviceLoader

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2  # argparse's convention for bad command lines
EXIT_FAILURE = 1


class UsageError(Exception):
    """A bad command line; the message is the complete one-line error."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # Python 3.11's argparse takes only "-5" or "-.5" for a negative number, so in
        # "--hidden -5,5" the value looked like a flag ("expected one argument"). Any word
        # that starts with "-" and a digit is a value (what Python 3.13's argparse does):
        # no flag of ours starts so. (An argparse without this attribute just ignores it.)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    # argparse prints the whole usage block and exits; we want one line and an exit code
    # that main() returns, so tests and callers can run main() in-process.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _value_parser(opt: Option) -> Any:
    """The argparse type of a TrainConfig option: its ``parse``, or a number checked against
    its range (one range for the flag and the config), with the command line's wording."""
    # 'none' asks for None where leaving the flag out would not (--max-loss none).
    none_word = opt.optional and opt.default is not None
    expected = _expected(opt) + (" or 'none'" if none_word else "")
    if opt.kind is int:
        unparsable = expected if expected.startswith("a positive") else "an integer"
    else:
        unparsable = "a number" + (" or 'none'" if none_word else "")

    def parse(text: str) -> Any:
        if none_word and text.strip().lower() == "none":
            return None
        if opt.parse is not None:
            try:
                return opt.parse(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        if opt.kind is str:
            return text
        try:
            value = opt.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsable}, got {text!r}") from None
        finite = opt.kind is int or math.isfinite(value)
        if not finite or (opt.range is not None and value not in opt.range):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _expected(opt: Option) -> str:
    """What a number flag accepts, as its error says: "a positive integer", "pixels from 0
    to 27", "a value in (0, 10)"."""
    r, integer = opt.range, opt.kind is int
    if r is None:
        return "an integer" if integer else "a number"
    if r == (Range(1) if integer else Range(0, low_open=True)):
        return "a positive integer" if integer else "a positive number"
    if r.high == math.inf:
        return f"{'an integer' if integer else 'a number'} {r.describe()}"
    if integer:
        return f"{opt.unit or 'a ' + opt.what} from {r.low} to {r.high}"
    return f"a value in {r.interval()}"


def _add_config_flags(group: Any) -> None:
    """One flag per TrainConfig option (fastmlp.workflow.config.OPTIONS), generated from it. Unset
    flags stay unset (SUPPRESS), so the command knows which were given (--resume, --preset)."""
    for opt in OPTIONS:
        if opt.flag is None:
            continue
        kw: dict[str, Any] = dict(dest=opt.name, default=argparse.SUPPRESS, help=_help(opt))
        if opt.metavar is not None:
            kw["metavar"] = opt.metavar
        if opt.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif opt.choices is not None:
            kw["choices"] = list(opt.choices)
        else:
            kw["type"] = _value_parser(opt)
        group.add_argument(opt.flag, **kw)


def _help(opt: Option) -> str:
    return opt.help_text().replace("%", "%%")  # argparse expands %(...)s in help


def _as_flags(settings: dict[str, Any]) -> str:
    """Config settings as the flags that give them: ``--lr 0.001 --no-augment``."""
    by_name = {opt.name: opt for opt in OPTIONS}
    words = []
    for name, value in settings.items():
        opt = by_name[name]
        if opt.flag is None:
            words.append(f"{name}={opt.text(value)}")
        elif opt.kind is bool:
            words.append(opt.flag if value else "--no-" + opt.flag[2:])
        else:
            words.append(f"{opt.flag} {opt.text(value)}")
    return " ".join(words)


def _flag(name: str) -> str:
    return next(opt.flag or name for opt in OPTIONS if opt.name == name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands (exposed for documentation and tests)."""
    p = _Parser(prog="fastmlp", description="Fast MLPs on Fashion-MNIST with fused kernels.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_samples_parser(sub)
    _add_bench_parser(sub)
    _add_tune_parser(sub)
    return p


# The subcommands' parsers, in the order `fastmlp --help` lists them. Options that several
# commands share take the same help text.
_TRUST_HELP = "allow loading checkpoints that contain pickled objects (only if trusted)"


def _option_help(name: str) -> str:
    return _help(next(opt for opt in OPTIONS if opt.name == name))


def _data_help() -> str:
    return _option_help("data")  # the same folder search for every command


def _device_help() -> str:
    return _option_help("device")


def _add_train_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    t = sub.add_parser(
        "train",
        help="train the fused MLP",
        description=(
            "Train the fused 784-512-512-10 MLP on Fashion-MNIST. Writes metrics.json, "
            "curves.png, confusion.png, last.pt and best.pt into --out. Unset options come "
            "from the documented recipe (or a --preset), or from the checkpoint with --resume. "
            "Runs unchanged under torchrun (DistributedDataParallel, one process per GPU or "
            "several on a CPU): --batch-size is then per process, rank 0 writes --out."
        ),
    )
    t.add_argument(
        "--out",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="output folder, used by one run at a time (default: a new runs/<date-time>; "
        "with --resume, the checkpoint's folder)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (default: refuse)",
    )
    t.add_argument(
        "--resume",
        metavar="CKPT",
        default=None,
        help="continue the run saved in CKPT (a last.pt) with its saved config: only --device, "
        "--data and --backend may change, --epochs extends it, other options are ignored",
    )
    t.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after epoch N (resume later with --resume)",
    )
    t.add_argument("--quiet", action="store_true", help="print only the final summary")
    presets = "; ".join(f"{name}: {_as_flags(settings)}" for name, settings in PRESETS.items())
    t.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="start from these settings instead of the documented recipe's; options given "
        f"override them (not with --resume). {presets}",
    )
    _add_config_flags(
        t.add_argument_group("training options (the fields of fastmlp.workflow.train.TrainConfig)")
    )
    t.set_defaults(func=_cmd_train)


def _add_evaluate_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    from fastmlp.workflow.config import TrainConfig

    e = sub.add_parser(
        "evaluate",
        help="test accuracy and loss of a checkpoint",
        description="Print test accuracy and mean loss of a checkpoint: a fastmlp .pt (run "
        "as the architecture it records), a state_dict saved by the tutorial (run as its ReLU "
        "MLP, with a note), or a whole model saved with torch.save(model) (with --trust; run "
        "as it is).",
    )
    e.add_argument("checkpoint", metavar="CKPT")
    e.add_argument("--data", metavar="DIR", default=None, help=_data_help())
    e.add_argument("--device", default="auto", help=_device_help())
    e.add_argument(
        "--precision",
        choices=list(hardware.TRAIN_PRECISIONS),
        default="auto",
        help="default auto (bf16 where the hardware computes it natively, else fp32)",
    )
    e.add_argument(
        "--batch-size",
        type=_positive_int,
        default=TrainConfig().eval_batch_size,
        help="default %(default)s",
    )
    e.add_argument("--trust", action="store_true", help=_TRUST_HELP)
    e.set_defaults(func=_cmd_evaluate)


def _add_predict_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    pr = sub.add_parser(
        "predict",
        help="classify image files",
        description="Classify PNG/JPEG images of any size: each is converted "
        "to 28x28 grayscale like Fashion-MNIST (light object on dark ground).",
    )
    pr.add_argument("checkpoint", metavar="CKPT")
    pr.add_argument("images", metavar="IMAGE", nargs="+")
    pr.add_argument("--top", type=_positive_int, default=1, help="show the K best classes")
    pr.add_argument(
        "--invert",
        choices=["auto", "yes", "no"],
        default="auto",
        help="invert dark-on-light images (auto: when the border is light)",
    )
    pr.add_argument("--device", default="auto", help=_device_help())
    pr.add_argument("--trust", action="store_true", help=_TRUST_HELP)
    pr.set_defaults(func=_cmd_predict)


def _add_samples_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser(
        "samples",
        help="save a 3x3 grid of labelled training images",
        description="The tutorial's 3x3 grid of random labelled training images.",
    )
    s.add_argument("--out", metavar="PNG", default="samples.png", help="default samples.png")
    s.add_argument("--data", metavar="DIR", default=None, help=_data_help())
    s.add_argument("--seed", type=_int, default=None, help="pick the same images every time")
    s.add_argument("--test", action="store_true", help="draw from the test split")
    s.set_defaults(func=_cmd_samples)


def _add_bench_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    b = sub.add_parser(
        "bench",
        help="how fast fastmlp is on this machine (about a minute)",
        description="Time fastmlp against eager PyTorch on this machine: ms per training step "
        "and seconds per epoch of the tutorial's MLP (batch 64, random images: no dataset "
        "needed), in fp32 and bf16, with the GEMM rate and the floor it sets. Names the CPU, "
        "its bf16 support and what --precision auto picks. With --grid, the shape grid "
        "instead: fastmlp against eager PyTorch and torch.compile on the CPU across widths, "
        "depths, batch sizes, dtypes and modes. With --serve, CPU inference as a service runs "
        "it: latency (p50/p99) at batch 1 and 8 and throughput at 64 and 4096 of the "
        "tutorial's MLP and a narrow one, against eager PyTorch and ONNX Runtime.",
    )
    b.add_argument("--device", default="auto", help=_device_help())
    b.add_argument(
        "--precision",
        choices=["all", *hardware.TRAIN_PRECISIONS],
        default="all",
        help="precisions to time (default all: fp32 and bf16)",
    )
    b.add_argument(
        "--compile", action="store_true", help="also time torch.compile (compiling takes a while)"
    )
    b.add_argument(
        "--short",
        action="store_true",
        help="a few seconds: a small epoch, few steps (with --grid: width 32, depth 2, "
        "batch 16, 1 round, eager and fastmlp only, unless the grid options say otherwise; "
        "with --serve: batch 1 and 64, 2 short rounds)",
    )
    b.add_argument(
        "--serve",
        action="store_true",
        help="time CPU inference as a service runs it instead (fp32, inference_mode): "
        "latency and throughput of fastmlp against eager PyTorch, ONNX Runtime where installed, "
        "and with --compile torch.compile and max-autotune (see docs/benchmarks.md)",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_grid_flags(b.add_argument_group("shape grid (--grid; see docs/benchmarks.md)"))
    b.set_defaults(func=_cmd_bench)


def _add_tune_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    t = sub.add_parser(
        "tune",
        help="measure the fastest CPU path for your MLP's shapes once, for later runs",
        description="Time every CPU path of the whole-MLP ops (a training step's forward and "
        "backward, and inference) at the MLP and batch sizes given, keep the fastest of "
        "each, and write them to the cache that later processes on this machine start "
        "from (FASTMLP_CACHE_DIR, default ~/.cache/fastmlp; see docs/cpu.md). Without it, "
        "each process measures a shape at its first call.",
    )
    t.add_argument(
        "--sizes",
        type=_int_list,
        default=(784, 512, 512, 10),
        metavar="LIST",
        help="layer widths from input to output (default 784,512,512,10: the tutorial's MLP)",
    )
    t.add_argument(
        "--batches",
        type=_int_list,
        default=(1, 64, 256, 4096),
        metavar="LIST",
        help="batch sizes (default 1,64,256,4096)",
    )
    t.add_argument(
        "--dtypes",
        type=_names(("fp32", "bf16")),
        default=("fp32",),
        metavar="LIST",
        help="default fp32; bf16 where the CPU computes it natively",
    )
    t.add_argument(
        "--activation",
        choices=activations.NAMES,
        default="relu",
        help="hidden activation (default relu)",
    )
    t.add_argument(
        "--show",
        action="store_true",
        help="print what the cache holds for this machine instead, measuring nothing",
    )
    t.set_defaults(func=_cmd_tune)


def _int_list(text: str) -> tuple[int, ...]:
    words = [word.strip() for word in text.split(",")]
    if not all(words):  # "32,,64" or a trailing comma: a width left out, not to be guessed
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return tuple(_positive_int(word) for word in words)


def _names(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        words = tuple(word.strip() for word in text.split(",") if word.strip())
        bad = [w for w in words if w not in allowed]
        if bad or not words:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}"
            )
        return words

    return parse


def _anchors(text: str) -> tuple[str, ...]:
    try:
        return grid.parse_anchors(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_grid_flags(g: Any) -> None:
    def lst(values: Sequence[object]) -> str:
        return ",".join(map(str, values))

    g.add_argument(
        "--grid",
        action="store_true",
        help="time the shape grid instead: a user's training step and inference (no_grad, "
        "inference_mode) of a 32 -> width x depth -> 16 ReLU MLP, eager against torch.compile "
        "and fastmlp, interleaved in one process (the full grid takes hours)",
    )
    knobs = (
        ("--widths", _int_list, "LIST", f"hidden widths (default {lst(grid.WIDTHS)})"),
        ("--depths", _int_list, "LIST", f"hidden layers (default {lst(grid.DEPTHS)})"),
        ("--batches", _int_list, "LIST", f"batch sizes (default {lst(grid.BATCHES)})"),
        ("--dtypes", _names(grid.DTYPES), "LIST", "default fp32,bf16 (bf16 only where native)"),
        ("--modes", _names(grid.MODES), "LIST", f"default {lst(grid.MODES)}"),
        ("--variants", _names(grid.ALL_VARIANTS), "LIST", f"default {lst(grid.VARIANTS)}"),
        ("--rounds", _positive_int, "N", f"interleaved rounds per point (default {grid.ROUNDS})"),
        (
            "--anchors",
            _anchors,
            "SHAPES",
            "shapes WIDTHxDEPTHxBATCH (e.g. 64x4x4096,128x4x65536) to also time "
            "torch.compile(mode='max-autotune') at",
        ),
        (
            "--max-gflop",
            _positive_float,
            "G",
            f"skip (and report) points whose step is more work (default {grid.MAX_GFLOP:g})",
        ),
    )
    for flag, kind, metavar, text in knobs:
        g.add_argument(flag, type=kind, default=None, metavar=metavar, help=text)


def _cmd_train(args: argparse.Namespace) -> int:
    from fastmlp.workflow.config import TrainConfig, resume_ignores
    from fastmlp.workflow.train import fit

    # Only the flags given are in args (SUPPRESS): a preset or the checkpoint fills the rest.
    given = {o.name: vars(args)[o.name] for o in OPTIONS if o.flag and o.name in vars(args)}
    if args.resume:
        if args.preset is not None:
            raise UsageError(
                "fastmlp train: error: --preset cannot be used with --resume: a resumed run "
                "keeps its saved config (see 'fastmlp train --help')"
            )
        # fit() applies the rule (config.resume_config); this only says what it drops.
        ignored = resume_ignores(given)
        if ignored and _rank() == 0:
            flags = ", ".join(_flag(name) for name in ignored)
            print(
                f"fastmlp train: note: resuming with the saved config; ignoring {flags}",
                file=sys.stderr,
            )
        out = getattr(args, "out", None) or Path(args.resume).parent
    else:
        out = getattr(args, "out", None)
    cfg = TrainConfig.from_preset(args.preset, **given) if args.preset else TrainConfig(**given)
    if not args.resume:
        _check_batch_size(cfg)
    made_default = out is None and _rank() == 0
    if out is None:
        # Rank 0 makes a new runs/<date-time>[-N], never one another run has. Other ranks
        # write nothing, but must also run with outputs on (the final evaluation for the
        # plots is collective), so they get a placeholder path they never touch.
        out = rundir.new_run_dir("runs") if _rank() == 0 else Path("runs") / "written-by-rank-0"
    log = None if args.quiet else print
    try:
        result = fit(
            cfg,
            out,
            resume=args.resume,
            epochs=given.get("epochs") if args.resume else None,
            stop_after=args.stop_after,
            overwrite=args.overwrite,
            log=log,
            progress=None if log else False,
        )
    except KeyboardInterrupt as e:
        # Ctrl-C, or SIGTERM (fit turns it into Terminated): exit 128 + the signal's number.
        terminated = isinstance(e, distributed.Terminated)
        if _rank() == 0:
            saved = Path(out) / "last.pt"
            how = " by SIGTERM" if terminated else ""
            hint = f"; continue with: fastmlp train --resume {saved}" if saved.is_file() else ""
            print(f"fastmlp train: interrupted{how}{hint}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if made_default:
            rundir.remove_if_unused(out)
    if result.epochs and result.rank == 0:
        last = result.epochs[-1]
        print(
            f"epoch {last['epoch']}: test accuracy {100 * last['test_accuracy']:.2f}% "
            f"(best {100 * result.best_accuracy:.2f}%); outputs in {out}"
        )
    return 0


def _check_batch_size(cfg: Any) -> None:
    """A batch larger than the training split is a usage error (found before any work)."""
    n = min(cfg.train_samples or data.TRAIN_SIZE, data.TRAIN_SIZE)
    if cfg.batch_size > n:
        raise UsageError(
            f"fastmlp train: error: --batch-size {cfg.batch_size} is larger than the {n} "
            f"training samples; use --batch-size {n} or less"
        )


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints summaries."""
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


def _load_model(
    path: str, device: str, trust: bool, prog: str
) -> tuple[torch.nn.Module, torch.device]:
    """The model in ``path`` (fastmlp.workflow.checkpoint.load_model): a whole pickled model as it
    is, else built from the recorded architecture, else the tutorial's ReLU MLP with a note
    on stderr saying so."""
    from fastmlp.hardware import resolve_device

    dev = resolve_device(device)

    def note(message: str) -> None:
        print(f"{prog}: note: {message}", file=sys.stderr)

    return ckpt.load_model(path, trusted=trust, device=dev, note=note), dev


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastmlp.workflow.loops import evaluate, test_error_line

    model, dev = _load_model(args.checkpoint, args.device, args.trust, "fastmlp evaluate")
    images, labels = data.load_split(False, args.data)
    loader = DeviceLoader(images, labels, args.batch_size, device=dev)
    r = evaluate(model, loader, hardware.resolve_precision(args.precision, dev))
    correct = int(r.confusion.diag().sum())
    print(test_error_line(r))
    print(
        f"test accuracy {100 * r.accuracy:.2f}% ({correct}/{len(labels)}), mean loss {r.loss:.4f}"
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    model, dev = _load_model(args.checkpoint, args.device, args.trust, "fastmlp predict")
    # Every readable image gets its answer; each unreadable one its own error line.
    good: list[tuple[str, torch.Tensor]] = []
    errors: list[str] = []
    for path in args.images:
        try:
            good.append((path, data.load_image(path, args.invert)))
        except (OSError, ValueError) as e:
            errors.append(str(e))
    if good:
        batch = torch.stack([image for _, image in good]).to(dev)
        with torch.no_grad():
            probs = torch.softmax(model(batch).float(), dim=1).cpu()
        k = min(args.top, probs.shape[1])
        for (path, _), p in zip(good, probs, strict=True):
            values, indices = p.topk(k)
            ranked = ", ".join(
                f"{data.labels_map.get(int(i), str(int(i)))} {v:.1%}"
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            )
            print(f"{path}: {ranked}")
    for message in errors:
        print(f"fastmlp predict: error: {message}", file=sys.stderr)
    return EXIT_FAILURE if errors else 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from fastmlp.workflow import plots

    images, labels = data.load_split(not args.test, args.data)
    g = torch.Generator()
    if args.seed is None:
        g.seed()
    else:
        g.manual_seed(args.seed)
    idx = torch.randint(len(labels), (9,), generator=g)
    titles = [data.labels_map[int(labels[i])] for i in idx]
    out = plots.save_samples(images[idx], titles, args.out)
    print(f"wrote {out}")
    return 0


_GRID_KNOBS: tuple[str, ...] = ("widths", "depths", "batches", "dtypes", "modes", "variants")
_GRID_KNOBS += ("rounds", "anchors", "max_gflop")
# --grid --short: a smoke grid of one tiny point per dtype and mode, no torch.compile.
_GRID_SHORT = dict(
    widths=(32,), depths=(2,), batches=(16,), rounds=1, variants=("eager", "fastmlp")
)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastmlp.bench import epochs as bench
    from fastmlp.hardware import resolve_device

    if args.grid and args.serve:
        raise UsageError("fastmlp bench: error: choose one of --grid and --serve")
    if args.grid:
        return _cmd_bench_grid(args)
    given = [k for k in _GRID_KNOBS if getattr(args, k) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"fastmlp bench: error: {flag} needs --grid (see 'fastmlp bench --help')")
    if args.serve:
        return _cmd_bench_serve(args)
    dev = resolve_device(args.device)
    if args.precision == "all":
        precisions: tuple[str, ...] = ("fp32", "bf16")
    else:
        precisions = (hardware.resolve_precision(args.precision, dev),)
    samples, steps = (2048, 5) if args.short else (60_000, 100)
    log = None if args.json else (lambda line: print(f"timing {line}...", file=sys.stderr))
    result = bench.run(
        dev, samples=samples, steps=steps, precisions=precisions, compile=args.compile, log=log
    )
    print(result.to_json() if args.json else bench.format_table(result))
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from fastmlp.bench import serve
    from fastmlp.hardware import resolve_device

    if args.precision != "all":
        raise UsageError("fastmlp bench: error: --serve times fp32 only; leave out --precision")
    if args.device != "auto" and resolve_device(args.device).type != "cpu":
        raise UsageError("fastmlp bench: error: --serve times the CPU; use --device cpu")
    short: dict[str, Any] = {}
    if args.short:
        short = dict(latency_batches=(1,), throughput_batches=(64,), rounds=2, round_s=0.02)
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = serve.run(variants=serve.default_variants(args.compile), log=log, **short)
    print(result.to_json() if args.json else serve.format_markdown(result))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from fastmlp import path_cache

    path = path_cache.cache_file()
    if args.show:
        entries = path_cache.entries_for_this_machine(path)
        print(f"{path}: {len(entries)} entries for this machine ({path_cache.fingerprint()})")
        for key, entry in sorted(entries.items()):
            print(f"  {key}: {entry['path']} ({entry['times']})")
        return 0
    if len(args.sizes) < 2:
        raise UsageError("fastmlp tune: error: --sizes needs at least 2 widths (input, output)")
    dtypes = tuple({"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes)
    if torch.bfloat16 in dtypes and not hardware.cpu_has_native_bf16():
        raise UsageError("fastmlp tune: error: this CPU has no native bf16; leave out bf16")
    choices = iter(path_cache.tune(args.sizes, args.batches, dtypes, args.activation))
    width = len(str(max(args.batches)))
    for dtype in args.dtypes:
        for batch in args.batches:
            for _phase in range(3):  # train, inference, backward (engines.CPU_PHASES)
                c = next(choices)
                print(f"{dtype} batch {batch:>{width}} {c.phase:<9} {c.path:<11} {c.reason}")
    print(f"wrote {path}: {path_cache.save(path)} entries for this machine")
    return 0


def _cmd_bench_grid(args: argparse.Namespace) -> int:
    from fastmlp.hardware import resolve_device

    for flag, bad in (("--precision", args.precision != "all"), ("--compile", args.compile)):
        if bad:
            raise UsageError(
                f"fastmlp bench: error: {flag} is not a --grid option; --grid uses --dtypes "
                "and --variants (see 'fastmlp bench --help')"
            )
    if args.device != "auto" and resolve_device(args.device).type != "cpu":
        raise UsageError("fastmlp bench: error: --grid times the CPU; use --device cpu")
    knobs = {k: getattr(args, k) for k in _GRID_KNOBS if getattr(args, k) is not None}
    if args.short:
        knobs = {**_GRID_SHORT, **knobs}
    axes = ("widths", "depths", "batches", "dtypes", "modes")
    points = grid.grid(*(knobs.get(k, getattr(grid, k.upper())) for k in axes))
    why = grid.why_none_timed(points, knobs.get("max_gflop", grid.MAX_GFLOP))
    if why is not None:
        raise UsageError(
            f"fastmlp bench: error: no grid point to time: {why}; select other points or a "
            "higher --max-gflop (see 'fastmlp bench --help')"
        )
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = grid.run(
        points,
        knobs.get("variants", grid.VARIANTS),
        anchors=knobs.get("anchors", ()),
        rounds=knobs.get("rounds", grid.ROUNDS),
        min_round_s=0.0 if args.short else grid.MIN_ROUND_S,
        max_gflop=knobs.get("max_gflop", grid.MAX_GFLOP),
        log=log,
    )
    print(result.to_json() if args.json else grid.format_markdown(result))
    return 0


def _check_cpu_path_environment() -> None:
    """A typo in FASTMLP_CPU_PATH stops the command before any work (without the compiled
    extension no op runs, and there is nothing to check)."""
    try:
        from fastmlp.engines import check_cpu_path_environment
    except ImportError:
        return
    check_cpu_path_environment()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastmlp`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    status."""
    prog = "fastmlp"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        prog = f"fastmlp {args.command}"
        _check_cpu_path_environment()
        return int(args.func(args))
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help and --version exit through here
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ImportError, MemoryError) as e:
        if os.environ.get("FASTMLP_DEBUG"):
            raise
        asked = hardware.allocation_bytes(e)
        if asked is None and isinstance(e, MemoryError) and not str(e):
            asked = 0  # Python's own, without a size
        if asked is not None:  # PyTorch's out-of-memory error is several lines long
            size = f" of {hardware.format_bytes(asked)} ({asked} bytes)" if asked else ""
            what = " or smaller --hidden widths" if prog == "fastmlp train" else ""
            print(
                f"{prog}: error: out of memory: an allocation{size} failed; use a smaller "
                f"--batch-size{what}",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        # data/checkpoint errors are ValueError/OSError/RuntimeError subclasses and carry
        # complete messages; others get their type name for context.
        from fastmlp.workflow.train import TrainingDiverged

        known = (
            data.DataNotFoundError,
            data.DataFormatError,
            data.DataReadError,
            ckpt.CheckpointError,
            rundir.RunDirError,
            TrainingDiverged,
            FileNotFoundError,
            ValueError,
            ImportError,
            MemoryError,  # build_model's, naming the layer
        )
        text = str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:
        if os.environ.get("FASTMLP_DEBUG"):
            raise
        print(
            f"{prog}: error: {type(e).__name__}: {e} (set FASTMLP_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
