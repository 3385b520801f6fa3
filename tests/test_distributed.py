"""Distributed training: environment checks, sharding, DDP with the fused ops, torchrun runs.

Everything runs on the CPU with gloo. Every launched process group is bounded by
``TIMEOUT``, so a hang fails the test instead of blocking CI. This file is also the torchrun
script of the failing-rank test (see the bottom).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from workflow_fixtures import REAL_DATA, needs_real_data

from fastmlp.nn import MLP
from fastmlp.workflow import checkpoint as ckpt
from fastmlp.workflow import distributed
from fastmlp.workflow.cli import main
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.train import TrainConfig, fit, train_loop

TIMEOUT = 120  # seconds for any process group launched here (each run takes ~10 s)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
FULL_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as if started by hand, whatever the shell running pytest has exported."""
    for name in (*TORCHRUN_VARS, "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- environment


def test_no_launcher_variables_means_one_process() -> None:
    assert distributed.detect_env({}) is None
    # An exported address alone does not make a process one of several.
    assert distributed.detect_env({"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}) is None


def test_torchrun_environment_is_read() -> None:
    env = distributed.detect_env(FULL_ENV)
    assert env == distributed.DistEnv(
        rank=1,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="node0",
        master_port=29500,
    )
    single_machine = {k: v for k, v in FULL_ENV.items() if k != "LOCAL_WORLD_SIZE"}
    assert distributed.detect_env(single_machine).local_world_size == 4  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        (["RANK"], ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]),
        (["RANK", "WORLD_SIZE", "LOCAL_RANK"], ["MASTER_ADDR", "MASTER_PORT"]),
        (["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"], ["RANK"]),
        (["LOCAL_RANK"], ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]),
    ],
)
def test_half_configured_environment_names_what_is_missing(
    present: list[str], missing: list[str]
) -> None:
    with pytest.raises(ValueError, match="incomplete distributed environment") as info:
        distributed.detect_env({k: FULL_ENV[k] for k in present})
    named = re.search(r" but (.*) (is|are) not\.", str(info.value))
    assert named is not None and named.group(1).split(", ") == missing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": "4"}, r"RANK=4 must be in \[0, 3\]"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"LOCAL_RANK": "2"}, r"LOCAL_RANK=2 must be in \[0, 1\]"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ],
)
def test_inconsistent_environment_is_refused(change: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        distributed.detect_env({**FULL_ENV, **change})


def test_cli_refuses_a_half_configured_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("RANK", "0")
    code = main(["train", "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "RANK is set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not" in err
    assert not (tmp_path / "run").exists()  # failed before touching anything


def test_train_help_documents_the_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "--backend {auto,gloo,nccl}" in out and "auto is nccl on CUDA, gloo on the CPU" in out
    assert "samples per step and process; under torchrun the global batch is this" in out


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert distributed.resolve_backend("auto", cpu) == "gloo"
    assert distributed.resolve_backend("gloo", cpu) == "gloo"
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        distributed.resolve_backend("nccl", cpu)
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        distributed.resolve_backend("mpi", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        TrainConfig(backend="mpi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher environment for a process group of one (a free port on this machine)."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("ending", ["success", "error", "ctrl-c", "sigterm"])
def test_process_group_is_destroyed_however_the_block_ends(
    ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _one_rank_env(monkeypatch)
    handler = signal.getsignal(signal.SIGTERM)
    raised: BaseException | None = None
    try:
        with distributed.process_group("auto", "cpu") as ctx:
            assert dist.is_initialized() and ctx.backend == "gloo" and ctx.world_size == 1
            if ending == "error":
                raise RuntimeError("boom")
            if ending == "ctrl-c":
                raise KeyboardInterrupt
            if ending == "sigterm":  # what torchrun sends the survivors when a peer fails
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises long before this ends
                pytest.fail("SIGTERM did not interrupt the block")
    except (RuntimeError, KeyboardInterrupt) as e:
        raised = e
    assert not dist.is_initialized()
    assert signal.getsignal(signal.SIGTERM) == handler  # our handler is gone again
    expected = {"success": type(None), "error": RuntimeError, "ctrl-c": KeyboardInterrupt}
    expected["sigterm"] = distributed.Terminated  # a KeyboardInterrupt: the way out of Ctrl-C
    assert type(raised) is expected[ending]


def test_an_existing_process_group_is_used_and_left_alone(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with distributed.process_group("auto", "cpu") as ctx:
            assert ctx.distributed and ctx.world_size == 1
        assert dist.is_initialized()  # the caller's group: theirs to destroy
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    ("n", "batch", "world", "drop_last"),
    [
        (1024, 64, 2, False),  # divides evenly
        (1001, 64, 2, False),  # short last global batch of 105: pieces of 52 and 53
        (130, 32, 4, False),  # last global batch of 2 over 4 ranks: two pieces empty
        (512, 64, 3, False),  # world size that does not divide the batch count
        (1001, 64, 2, True),
    ],
)
def test_shards_are_slices_of_the_single_process_batches(
    n: int, batch: int, world: int, drop_last: bool
) -> None:
    """Rank r's batch i is the r-th piece of batch i of one process with batch*world, images
    and augmentation included; every sample is seen exactly once per epoch."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n)  # labels are the sample indices
    kw: dict[str, Any] = dict(shuffle=True, drop_last=drop_last, seed=3, augment=True)
    kw["max_shift"] = 2
    single = DeviceLoader(images, labels, batch * world, **kw)
    ranks = [
        DeviceLoader(images, labels, batch, rank=r, world_size=world, **kw) for r in range(world)
    ]
    assert {len(loader) for loader in ranks} == {len(single)}  # DDP needs equal step counts
    for epoch in range(2):
        seen = []
        weighted = [loader.weighted_batches() for loader in ranks]
        for step, (whole, *pieces) in enumerate(zip(single, *weighted, strict=True)):
            assert torch.equal(torch.cat([p[1] for p in pieces]), whole[1]), (epoch, step)
            assert torch.equal(torch.cat([p[0] for p in pieces]), whole[0]), (epoch, step)
            sizes = [len(p[1]) for p in pieces]
            assert max(sizes) - min(sizes) <= 1
            if len(whole[1]) == batch * world:
                assert sizes == [batch] * world
            weights = [p[2] for p in pieces]
            assert weights == [s * world / len(whole[1]) for s in sizes]
            assert sum(weights) == pytest.approx(world)  # mean weight 1: DDP's average
            seen.append(whole[1])
        order = torch.cat(seen)
        expected = (n // (batch * world)) * batch * world if drop_last else n
        assert len(order) == expected and len(set(order.tolist())) == expected
    assert not torch.equal(*[torch.cat([y for _, y in ranks[0]]) for _ in range(2)])  # reshuffled


def test_sharded_evaluation_order_is_contiguous() -> None:
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    loaders = [DeviceLoader(images, torch.arange(10), 2, rank=r, world_size=2) for r in (0, 1)]
    assert [y.tolist() for _, y in loaders[0]] == [[0, 1], [4, 5], [8]]
    assert [y.tolist() for _, y in loaders[1]] == [[2, 3], [6, 7], [9]]


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, 0)])
def test_sharded_loader_rejects_bad_ranks(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4), rank=rank,
                     world_size=world)  # fmt: skip


@pytest.mark.parametrize("n", [5, 1])  # 2+3 samples; 0+1 (an empty piece)
def test_train_loop_weights_make_the_rank_average_the_global_mean(n: int) -> None:
    """What DDP computes (the mean over ranks of each rank's gradient) equals the gradient
    of the mean loss over the whole short batch, even when the pieces are unequal; so does
    the mean of the losses train_loop returns. An empty piece still reaches every
    parameter (DDP's hooks must fire on every rank), with a zero gradient."""
    torch.manual_seed(0)
    model = MLP((784, 16, 10))
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def grads(loader: DeviceLoader) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        # lr=0: the one step leaves the weights as they are and its gradients in .grad.
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_loop(loader, model, loss_fn, opt, log=None)
        return loss, [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    expected_loss, expected = grads(DeviceLoader(images, labels, 2 * n))
    (loss0, grads0), (loss1, grads1) = (
        grads(DeviceLoader(images, labels, n, rank=r, world_size=2)) for r in range(2)
    )
    assert (loss0 + loss1) / 2 == pytest.approx(expected_loss, rel=1e-6)
    for e, a, b in zip(expected, grads0, grads1, strict=True):
        torch.testing.assert_close((a + b) / 2, e)
    if n == 1:  # rank 0's piece is empty
        assert loss0 == 0 and all(not g.any() for g in grads0)


def test_ddp_models_take_the_autograd_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """FusedSGD offers train_loop no fused step for a DDP model: DDP must all-reduce the
    gradients between backward and update."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastmlp.optim import FusedSGD

    _one_rank_env(monkeypatch)
    with distributed.process_group("gloo", "cpu"):
        model = MLP((784, 16, 10))
        opt = FusedSGD(model, lr=0.1)
        loss_fn = torch.nn.CrossEntropyLoss()
        assert opt.train_step_for(model, loss_fn) is not None
        assert opt.train_step_for(DDP(model), loss_fn) is None


# ---------------------------------------------------------------- DDP with the fused ops


def _ddp_worker(rank: int, world: int, store: str) -> None:
    """Gradients of DDP over the fused MLP: plain, with no_sync accumulation, compiled."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same data and initial weights on every rank
        reference = MLP()  # the tutorial's 784-512-512-10: 2.7 MB of parameters
        x, y = torch.randn(4 * world, 784), torch.randint(0, 10, (4 * world,))
        loss_fn = torch.nn.functional.cross_entropy

        def mean_grads(rows: slice) -> list[torch.Tensor]:
            reference.zero_grad()
            loss_fn(reference(x[rows]), y[rows]).backward()
            return [p.grad.clone() for p in reference.parameters()]  # type: ignore[union-attr]

        def check(model: torch.nn.Module, expected: list[torch.Tensor], what: str) -> None:
            for p, e in zip(model.parameters(), expected, strict=True):
                torch.testing.assert_close(p.grad, e, msg=lambda m: f"{what}: {m}")

        everything = mean_grads(slice(None))
        mine = slice(4 * rank, 4 * rank + 4)

        model = MLP()
        model.load_state_dict(reference.state_dict())
        # 1 MB buckets: DDP reduces everything in one bucket at first, then rebuilds them
        # in the order backward produced the gradients: three all-reduces, each started
        # while backward still runs.
        ddp = DDP(model, bucket_cap_mb=1)
        for step in range(3):
            model.zero_grad()
            loss_fn(ddp(x[mine]), y[mine]).backward()
            check(model, everything, f"step {step}")
        assert ddp._get_ddp_logging_data()["num_buckets_reduced"] == 3

        # Gradient accumulation: two micro-batches, only the second one synchronized.
        model.zero_grad()
        halves = [slice(4 * rank, 4 * rank + 2), slice(4 * rank + 2, 4 * rank + 4)]
        with ddp.no_sync():
            (loss_fn(ddp(x[halves[0]]), y[halves[0]]) / 2).backward()
        local = mean_grads(halves[0])
        check(model, [g / 2 for g in local], "inside no_sync (no communication yet)")
        (loss_fn(ddp(x[halves[1]]), y[halves[1]]) / 2).backward()
        check(model, everything, "after no_sync accumulation")

        # torch.compile of the DDP model: graphs split at bucket boundaries, and the fused
        # op traced through its fake implementation.
        model.zero_grad()
        compiled = torch.compile(ddp)
        loss_fn(compiled(x[mine]), y[mine]).backward()
        check(model, everything, "compiled DDP")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_with_the_fused_ops_no_sync_and_compile(tmp_path: Path) -> None:
    procs = mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT
    while not procs.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"DDP workers still running after {TIMEOUT} s")


# ---------------------------------------------------------------- torchrun runs


def torchrun(*args: str, cwd: Path, script: str | None = None) -> tuple[int, str]:
    """``torchrun --standalone --nproc_per_node=2`` of ``fastmlp`` (or ``script``), bounded
    by TIMEOUT; returns the exit status and the combined output."""
    target = [script] if script else ["-m", "fastmlp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {k: v for k, v in os.environ.items() if k not in (*TORCHRUN_VARS, "MASTER_PORT")}
    proc = subprocess.Popen(
        [*cmd, *target, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers (own sessions)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"torchrun still running after {TIMEOUT} s:\n{out[-4000:]}")
    return proc.returncode, out


# 2047 = 15 global batches of 128 and a short one of 127 (64 + 63): the uneven split and its
# loss weighting are part of what must match. Augmentation stays on (flip + shift).
# fp32 pinned: the comparisons below are at fp32 rounding, and --precision auto picks bf16
# on CPUs with AVX512-BF16/AMX.
RUN = dict(
    epochs=2,
    train_samples=2047,
    max_shift=1,
    seed=5,
    device="cpu",
    data=str(REAL_DATA),
    precision="fp32",
)
PER_RANK_BATCH = 64


def _flags(**kw: Any) -> list[str]:
    return [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("ddp")
    code, out = torchrun(
        "train", *_flags(**RUN, batch_size=PER_RANK_BATCH, out=work / "run"), cwd=work
    )
    assert code == 0, out[-4000:]
    return work / "run", out


@pytest.fixture(scope="module")
def one_process_run() -> Any:
    return fit(TrainConfig(**RUN, batch_size=2 * PER_RANK_BATCH), None, log=None, progress=False)


@pytest.mark.slow
@needs_real_data
def test_two_processes_match_one_process_with_the_same_global_batch(
    two_process_run: tuple[Path, str], one_process_run: Any
) -> None:
    run, _ = two_process_run
    state = ckpt.load_checkpoint(run / "last.pt")
    # Same maths, different rounding: DDP averages two 64-sample means where one process
    # takes one 128-sample mean, and gloo sums in its own order. That is ~1e-7 relative per
    # step (one process may also take FusedSGD's one-kernel step, DDP the autograd one);
    # after 32 SGD steps the weights (|w| ~ 0.05-0.3) differ by 3e-8 to 1e-7. A real mistake
    # moves them far more: leaving the short last batch unweighted alone (64 + 63 samples,
    # twice) gives 2e-4. 2e-6 separates the two with a factor of 20 or more either side.
    for key, value in one_process_run.model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=2e-6, msg=key)
    for two, one in zip(state["metrics"], one_process_run.epochs, strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
        assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2e-4)


@pytest.mark.slow
@needs_real_data
def test_rank_zero_alone_writes_and_records_the_world(two_process_run: tuple[Path, str]) -> None:
    run, out = two_process_run
    assert sorted(p.name for p in run.iterdir()) == [
        ".fastmlp.lock",  # rank 0's claim on the folder (fastmlp.workflow.rundir)
        "best.pt",
        "confusion.png",
        "curves.png",
        "last.pt",
        "metrics.json",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2 and metrics["config"]["backend"] == "gloo"
    assert metrics["config"]["batch_size"] == PER_RANK_BATCH  # per process, as given
    assert set(ckpt.load_checkpoint(run / "last.pt")["model"]) == set(MLP().state_dict())
    assert out.count("Epoch 1\n") == 1 and out.count("Done! best test accuracy") == 1
    assert out.count("epoch 2: test accuracy") == 1  # the CLI's summary, rank 0 only


@pytest.mark.slow
@needs_real_data
def test_resume_under_two_processes(two_process_run: tuple[Path, str], tmp_path: Path) -> None:
    straight, _ = two_process_run
    split = tmp_path / "run"
    flags = _flags(**RUN, batch_size=PER_RANK_BATCH, out=split)
    code, out = torchrun("train", *flags, "--stop-after", "1", cwd=tmp_path)
    assert code == 0, out[-4000:]
    assert ckpt.load_checkpoint(split / "last.pt")["epoch"] == 1
    code, out = torchrun("train", "--resume", str(split / "last.pt"), cwd=tmp_path)
    assert code == 0, out[-4000:]
    assert out.count("Resuming from") == 1
    a = ckpt.load_checkpoint(straight / "last.pt")
    b = ckpt.load_checkpoint(split / "last.pt")
    for key in a["model"]:  # gloo reduces in a fixed order: resuming is exact on the CPU
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [e["epoch"] for e in b["metrics"]] == [1, 2]
    assert [e["test_accuracy"] for e in a["metrics"]] == [e["test_accuracy"] for e in b["metrics"]]


@pytest.mark.slow
@needs_real_data
def test_resume_with_another_number_of_processes_is_refused(
    two_process_run: tuple[Path, str],
) -> None:
    run, _ = two_process_run
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\) and this run has 1"):
        fit(None, None, resume=run / "last.pt", log=None, progress=False)


@pytest.mark.slow
@needs_real_data
def test_one_rank_process_group_trains_and_shuts_down(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _one_rank_env(monkeypatch)
    cfg = TrainConfig(
        epochs=1, batch_size=128, train_samples=1024, device="cpu", data=str(REAL_DATA)
    )
    result = fit(cfg, tmp_path, log=None, progress=False)
    assert not dist.is_initialized()
    assert result.world_size == 1 and not isinstance(
        result.model, torch.nn.parallel.DistributedDataParallel
    )
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["backend"] == "gloo" and config["world_size"] == 1


@pytest.mark.slow
@needs_real_data
def test_a_failing_rank_makes_the_launcher_exit_nonzero(tmp_path: Path) -> None:
    # A hang instead of an exit fails inside torchrun() at its timeout.
    code, out = torchrun(
        "train",
        *_flags(**RUN, batch_size=PER_RANK_BATCH, out=tmp_path / "run"),
        cwd=tmp_path,
        script=__file__,
    )
    assert code != 0, out[-4000:]
    assert "injected failure on rank 1 in epoch 2" in out
    assert ckpt.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1  # epoch 1 kept


def _failing_train_loop(loader: Any, model: Any, loss_fn: Any, *args: Any, **kw: Any) -> float:
    """train_loop whose rank 1 raises at the second step of epoch 2. Rank 1 gets there only
    after step 1's gradient all-reduce, which rank 0 joins after saving epoch 1."""
    from fastmlp.workflow import loops

    calls = 0

    def failing_loss(*a: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected failure on rank 1 in epoch 2")
        return loss_fn(*a)

    rank1_epoch2 = int(os.environ["RANK"]) == 1 and loader.epoch == 1
    return loops.train_loop(loader, model, failing_loss if rank1_epoch2 else loss_fn, *args, **kw)


if __name__ == "__main__":  # torchrun's script in the failing-rank test: `fastmlp` + a fault
    import fastmlp.workflow.train

    fastmlp.workflow.train.train_loop = _failing_train_loop  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
