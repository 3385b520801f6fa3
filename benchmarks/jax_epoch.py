"""The tutorial's training epoch in JAX, for comparison with ``fastmlp train`` (issue 32).

Not part of the suite, and JAX is not a dependency of fastmlp: run it with a Python that has
``jax`` and ``numpy`` (``python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax
jaxlib``). It trains the tutorial's MLP (784-512-512-10, ReLU, PyTorch's nn.Linear
initialisation) on Fashion-MNIST with the tutorial's hyperparameters: plain SGD, lr 1e-3, no
momentum or weight decay, mean cross-entropy, batch 64, fp32, the images reshuffled every
epoch. The whole epoch is one jitted ``lax.scan`` over the batches, the data on the device
(the CPU) beforehand, so the time is the step's work only. Epoch 1 compiles and is not
timed; prints the seconds of each later epoch and the test accuracy.

    /tmp/jaxenv/bin/python benchmarks/jax_epoch.py [--data DIR] [--epochs 4]

The last partial batch (60000 = 937 x 64 + 32) is dropped; fastmlp's loader keeps it, one
more step of 32 rows in 938 (0.05% of the work).
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (784, 512, 512, 10)
BATCH, LR = 64, 1e-3
DEBIAN = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"))
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int32)


def init(key: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both."""
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=False):
        key, kw, kb = jax.random.split(key, 3)
        bound = fan_in**-0.5
        w = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
        b = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
        params.append((w, b))
    return params


def forward(params: list[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i + 1 < len(params):
            x = jax.nn.relu(x)
    return x


def loss_fn(params: list[tuple[jax.Array, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    logits = forward(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@jax.jit
def epoch(params, x, y, key):  # type: ignore[no-untyped-def]
    steps = x.shape[0] // BATCH
    order = jax.random.permutation(key, x.shape[0])[: steps * BATCH].reshape(steps, BATCH)

    def step(p, idx):  # type: ignore[no-untyped-def]
        loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
        return jax.tree_util.tree_map(lambda a, g: a - LR * g, p, grads), loss

    params, losses = jax.lax.scan(step, params, order)
    return params, losses.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FASTMLP_DATA", DEBIAN))
    parser.add_argument("--epochs", type=int, default=4, help="epochs, the first untimed")
    args = parser.parse_args()
    x, y = (jnp.asarray(a) for a in load(args.data, "train"))
    xt, yt = load(args.data, "t10k")
    key = jax.random.PRNGKey(0)
    params = init(key)
    seconds = []
    for e in range(args.epochs):
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        params, loss = epoch(params, x, y, sub)
        loss.block_until_ready()
        if e > 0:
            seconds.append(time.perf_counter() - start)
        print(f"epoch {e + 1}: loss {float(loss):.4f}, {time.perf_counter() - start:.2f} s")
    acc = float((np.asarray(forward(params, jnp.asarray(xt))).argmax(1) == yt).mean())
    print(
        f"jax {jax.__version__}: median {statistics.median(seconds):.2f} s per epoch "
        f"(epochs 2-{args.epochs}), test accuracy {acc:.1%}"
    )


if __name__ == "__main__":
    main()
