"""The ``fastmlp`` command: train, evaluate, predict, samples.

A thin shell over :mod:`fastmlp.train`, :mod:`fastmlp.checkpoint` and :mod:`fastmlp.data`.
Every failure a user can cause (a bad flag or value, missing data, a damaged or unsafe
checkpoint, an unreadable image) ends in a short ``fastmlp …: error: …`` message on stderr
and a non-zero exit status, never a traceback (set ``FASTMLP_DEBUG=1`` to get one).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from fastmlp import checkpoint as ckpt
from fastmlp import data, hardware, rundir
from fastmlp.loader import DeviceLoader

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2  # argparse's convention for bad command lines
EXIT_FAILURE = 1


class UsageError(Exception):
    """A bad command line; the message is the complete one-line error."""


class _Parser(argparse.ArgumentParser):
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


def _int_in(low: int, high: int, what: str) -> Any:
    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} from {low} to {high}, got {text!r}")
        return value

    return parse


def _max_loss(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def _float_in(low: float, high: float, low_open: bool = False, high_open: bool = True) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(
                f"expected a value in {lo}{low}, {high}{hi}, got {text!r}"
            )
        return value

    return parse


def _sizes(text: str) -> tuple[int, ...]:
    try:
        hidden = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 512,512, got {text!r}") from None
    if not hidden or min(hidden) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 512,512, got {text!r}")
    return (data.IMAGE_SIZE * data.IMAGE_SIZE, *hidden, len(data.CLASSES))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands (exposed for documentation and tests)."""
    from fastmlp.train import IMAGE_SIZE, SEED_RANGE, TrainConfig

    d = TrainConfig()
    p = _Parser(prog="fastmlp", description="Fast MLPs on Fashion-MNIST with fused kernels.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    data_help = (
        "folder with the Fashion-MNIST IDX files (default: $FASTMLP_DATA if set, else "
        "~/.cache/fastmlp or /usr/share/datasets/fashion-mnist)"
    )
    device_help = "auto (GPU if present), cpu, cuda or cuda:N (default: auto)"
    trust_help = "allow loading checkpoints that contain pickled objects (only if trusted)"

    t = sub.add_parser(
        "train",
        help="train the fused MLP",
        description=(
            "Train the fused 784-512-512-10 MLP on Fashion-MNIST. Writes metrics.json, "
            "curves.png, confusion.png, last.pt and best.pt into --out. Unset options come "
            "from the documented recipe, or from the checkpoint with --resume. Runs "
            "unchanged under torchrun (DistributedDataParallel, one process per GPU or "
            "several on a CPU): --batch-size is then per process, rank 0 writes --out."
        ),
    )
    S = argparse.SUPPRESS  # unset options stay unset, so --resume can tell what was given
    t.add_argument("--data", metavar="DIR", default=S, help=data_help)
    t.add_argument(
        "--out",
        metavar="DIR",
        default=S,
        help="output folder, used by one run at a time (default: a new runs/<date-time>; "
        "with --resume, the checkpoint's folder)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (default: refuse)",
    )
    t.add_argument(
        "--epochs",
        type=_positive_int,
        default=S,
        help=f"default {d.epochs}; with --resume: continue the run to this many epochs in "
        "total (a cosine/onecycle schedule is laid out again over the new total)",
    )
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=S,
        help="samples per step and process; under torchrun the global batch is this times "
        f"the number of processes (default {d.batch_size})",
    )
    t.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], default=S, help=f"default {d.optimizer}"
    )
    t.add_argument(
        "--lr",
        type=_float_in(0, 10, low_open=True),
        default=S,
        help=f"peak learning rate, default {d.lr}",
    )
    t.add_argument("--momentum", type=_float_in(0, 1), default=S, help=f"default {d.momentum}")
    t.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=S,
        help=f"Nesterov momentum for SGD (default: {d.nesterov})",
    )
    t.add_argument(
        "--weight-decay", type=_float_in(0, 1), default=S, help=f"default {d.weight_decay}"
    )
    t.add_argument(
        "--schedule",
        choices=["none", "onecycle", "cosine"],
        default=S,
        help=f"learning-rate schedule, stepped per batch (default {d.schedule})",
    )
    t.add_argument(
        "--warmup",
        type=_float_in(0, 1, low_open=True),
        default=S,
        help=f"one-cycle warm-up fraction of all steps (default {d.warmup})",
    )
    t.add_argument(
        "--label-smoothing", type=_float_in(0, 1), default=S, help=f"default {d.label_smoothing}"
    )
    t.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=S,
        help=f"random horizontal flip, plus --max-shift (default: {d.augment})",
    )
    t.add_argument(
        "--max-shift",
        type=_int_in(0, IMAGE_SIZE - 1, "pixels"),
        default=S,
        metavar="PX",
        help=f"random shift in pixels under --augment (default {d.max_shift})",
    )
    t.add_argument(
        "--hidden",
        type=_sizes,
        default=S,
        dest="sizes",
        metavar="W,W",
        help="hidden layer widths (default 512,512)",
    )
    t.add_argument(
        "--precision",
        choices=list(hardware.PRECISIONS),
        default=S,
        help=f"default {d.precision}: bf16 where the CPU (AVX512-BF16/AMX) or GPU computes it "
        "natively, else fp32; bf16 elsewhere is emulated and several times slower",
    )
    t.add_argument("--device", default=S, help=device_help)
    t.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default=S,
        help="process-group backend under torchrun: auto is nccl on CUDA, gloo on the CPU "
        "(default auto; unused in a single process)",
    )
    t.add_argument(
        "--seed", type=_int_in(*SEED_RANGE, "a seed"), default=S, help=f"default {d.seed}"
    )
    t.add_argument(
        "--max-loss",
        type=_max_loss,
        default=S,
        metavar="X",
        help="stop as diverged when an epoch's mean train loss exceeds X; NaN/inf always "
        f"stop the run; 'none': no limit (default {d.max_loss:g})",
    )
    t.add_argument(
        "--train-samples",
        type=_positive_int,
        default=S,
        metavar="N",
        help="train on the first N images only (quick checks; default: all 60000)",
    )
    t.add_argument(
        "--resume", metavar="CKPT", default=None, help="continue the run saved in CKPT (a last.pt)"
    )
    t.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after epoch N (resume later with --resume)",
    )
    t.add_argument("--quiet", action="store_true", help="print only the final summary")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="test accuracy and loss of a checkpoint",
        description="Print test accuracy and mean loss of a checkpoint "
        "(a fastmlp .pt, or a state_dict saved by the tutorial).",
    )
    e.add_argument("checkpoint", metavar="CKPT")
    e.add_argument("--data", metavar="DIR", default=None, help=data_help)
    e.add_argument("--device", default="auto", help=device_help)
    e.add_argument(
        "--precision",
        choices=list(hardware.PRECISIONS),
        default="auto",
        help="default auto (bf16 where the hardware computes it natively, else fp32)",
    )
    e.add_argument(
        "--batch-size", type=_positive_int, default=d.eval_batch_size, help="default %(default)s"
    )
    e.add_argument("--trust", action="store_true", help=trust_help)
    e.set_defaults(func=_cmd_evaluate)

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
    pr.add_argument("--device", default="auto", help=device_help)
    pr.add_argument("--trust", action="store_true", help=trust_help)
    pr.set_defaults(func=_cmd_predict)

    s = sub.add_parser(
        "samples",
        help="save a 3x3 grid of labelled training images",
        description="The tutorial's 3x3 grid of random labelled training images.",
    )
    s.add_argument("--out", metavar="PNG", default="samples.png", help="default samples.png")
    s.add_argument("--data", metavar="DIR", default=None, help=data_help)
    s.add_argument("--seed", type=_int, default=None, help="pick the same images every time")
    s.add_argument("--test", action="store_true", help="draw from the test split")
    s.set_defaults(func=_cmd_samples)

    b = sub.add_parser(
        "bench",
        help="how fast fastmlp is on this machine (about a minute)",
        description="Time fastmlp against eager PyTorch on this machine: ms per training step "
        "and seconds per epoch of the tutorial's MLP (batch 64, random images: no dataset "
        "needed), in fp32 and bf16, with the GEMM rate and the floor it sets. Names the CPU, "
        "its bf16 support and what --precision auto picks.",
    )
    b.add_argument("--device", default="auto", help=device_help)
    b.add_argument(
        "--precision",
        choices=["all", *hardware.PRECISIONS],
        default="all",
        help="precisions to time (default all: fp32 and bf16)",
    )
    b.add_argument(
        "--compile", action="store_true", help="also time torch.compile (compiling takes a while)"
    )
    b.add_argument("--short", action="store_true", help="a few seconds: a small epoch, few steps")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench)
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from fastmlp.train import TrainConfig, fit

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if args.resume:
        # The saved config decides what is computed; only where may change, and how long.
        where = ("device", "data", "backend")
        ignored = sorted(set(given) - {*where, "epochs"})
        if ignored and _rank() == 0:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            print(
                f"fastmlp train: note: resuming with the saved config; ignoring {flags}",
                file=sys.stderr,
            )
        cfg = TrainConfig(**{k: v for k, v in given.items() if k in where})
        out = getattr(args, "out", None) or Path(args.resume).parent
    else:
        cfg = TrainConfig(**given)
        _check_batch_size(cfg)
        out = getattr(args, "out", None)
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
    except KeyboardInterrupt:
        if _rank() == 0:
            saved = Path(out) / "last.pt"
            hint = f"; continue with: fastmlp train --resume {saved}" if saved.is_file() else ""
            print(f"fastmlp train: interrupted{hint}", file=sys.stderr)
        return 130
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


def _load_model(path: str, device: str, trust: bool) -> tuple[torch.nn.Module, torch.device]:
    from fastmlp.train import build_model, resolve_device

    dev = resolve_device(device)
    state = ckpt.extract_state_dict(ckpt.load_checkpoint(path, trusted=trust))
    sizes = ckpt.sizes_from_state_dict(state)
    if sizes[0] != 28 * 28 or sizes[-1] != len(data.CLASSES):
        raise ckpt.CheckpointError(
            f"{path} holds a {sizes[0]}-input, {sizes[-1]}-output model; Fashion-MNIST needs "
            f"784 inputs (28x28) and {len(data.CLASSES)} outputs (its classes): use a "
            "checkpoint of a Fashion-MNIST model"
        )
    model = build_model(sizes, dev)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: state_dict does not fit the MLP: {e}") from None
    return model.eval(), dev


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastmlp.train import evaluate, test_error_line

    model, dev = _load_model(args.checkpoint, args.device, args.trust)
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
    model, dev = _load_model(args.checkpoint, args.device, args.trust)
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
    from fastmlp import plots

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


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastmlp import bench
    from fastmlp.train import resolve_device

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastmlp`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    status."""
    prog = "fastmlp"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        prog = f"fastmlp {args.command}"
        return int(args.func(args))
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help and --version exit through here
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        if os.environ.get("FASTMLP_DEBUG"):
            raise
        # data/checkpoint errors are ValueError/OSError/RuntimeError subclasses and carry
        # complete messages; others get their type name for context.
        from fastmlp.train import TrainingDiverged

        known = (
            data.DataNotFoundError,
            data.DataFormatError,
            ckpt.CheckpointError,
            rundir.RunDirError,
            TrainingDiverged,
            FileNotFoundError,
            ValueError,
            ImportError,
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
