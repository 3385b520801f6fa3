"""Memory the CPU ops keep or need (docs/cpu.md, "Memory"): per-thread scratch is bounded
(buffers above 8 MiB are given back when the call ends), and the layered path's inference
keeps at most two layers' activations alive, as eager PyTorch. Issue 29, item 6.

Each measurement runs in a fresh process: resident memory and its high-water mark are
process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts Python processes

_PRELUDE = """
import ctypes, gc, resource, sys, threading
import torch, fastmlp
from fastmlp import engines
torch.manual_seed(0)
libc = ctypes.CDLL("libc.so.6")
def rss_mb():
    gc.collect()
    libc.malloc_trim(0)  # what the allocator could give back is not what we keep
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

# One training step of a wide MLP (activations of 32 MiB, gradient parts of 64 MiB), then
# what stays resident once the model and its gradients are gone.
_RETAINED = """
path, activation, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = fastmlp.MLP((64, 4096, 64, 4096, 8), activation=activation)
x = torch.randn(2048, 64)
base = rss_mb()
done, leave = threading.Semaphore(0), threading.Event()
def step():
    with engines.force_cpu_path(path):
        model(x).sum().backward()
        with torch.no_grad():
            model(x)
def idle_after_a_step():
    step()
    done.release()
    leave.wait()  # alive, holding its thread-local scratch, while we measure
workers = [threading.Thread(target=idle_after_a_step) for _ in range(threads)]
for t in workers:
    t.start()
for _ in workers:
    done.acquire()
if not workers:
    step()
model.zero_grad(set_to_none=True)
print(rss_mb() - base)
leave.set()
"""

_PEAK = """
runner = sys.argv[1]
widths = (32,) + (2048,) * 6 + (16,)
if runner == "fastmlp":
    model = fastmlp.MLP(widths)
else:
    model = fastmlp.nn.unfuse(fastmlp.MLP(widths))
x = torch.randn(8192, 32)
with torch.inference_mode():
    model(x[:8])
    before = peak_mb()
    model(x)
print(peak_mb() - before)
"""


def _run(code: str, *args: str) -> float:
    run = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    return float(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("path", ["layered", "row_blocked"])
def test_scratch_kept_after_a_big_call_is_bounded(path: str, activation: str):
    # Before the bound: the layered path kept every buffer it had ever needed (hundreds of
    # MB after one call of a 8192-wide MLP, until the thread exited).
    assert _run(_RETAINED, path, activation, "0") < 48


def test_idle_threads_keep_bounded_scratch():
    # Four idle threads that each made one call (before: +1,314 MB for a 8192-wide MLP
    # until they exited).
    assert _run(_RETAINED, "layered", "gelu", "4") < 224


def test_layered_inference_peak_is_near_eager():
    # 32-2048x6-16 at 8192 rows: a layer's activations are 64 MiB. Before: every layer's
    # were alive at once (386 MB over the start, eager 131 MB).
    fused = _run(_PEAK, "fastmlp")
    eager = _run(_PEAK, "eager")
    assert fused <= 1.25 * eager + 16, (fused, eager)
