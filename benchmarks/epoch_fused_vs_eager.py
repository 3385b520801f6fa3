"""One training epoch of the tutorial MLP, fused vs eager, in the same loop.

Both models start from the same weights; the eager one is ``fastmlp.unfuse(MLP())``
(plain nn.Linear + nn.ReLU). Data comes from the in-memory DeviceLoader, so the
difference is the layers alone. Epochs of the two models alternate (so that a slow
spell of a shared machine hits both) and the fastest epoch of each is reported.

    python benchmarks/epoch_fused_vs_eager.py --batch-sizes 64 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fastmlp
from fastmlp import data
from fastmlp.loader import DeviceLoader


def one_epoch(model, opt, loader) -> float:
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=4, help="per model; the fastest counts")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: search)")
    args = parser.parse_args()
    images, labels = data.load_split(train=True, root=args.data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | fastmlp fused | eager PyTorch | speed-up |\n|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        runs = {}
        for name in ("fused", "eager"):
            torch.manual_seed(0)
            model = fastmlp.MLP()
            if name == "eager":
                fastmlp.unfuse(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
            loader = DeviceLoader(images, labels, batch_size=batch, shuffle=True)
            runs[name] = (model, opt, loader)
        times = {name: float("inf") for name in runs}
        for _ in range(args.epochs):
            for name, run in runs.items():
                times[name] = min(times[name], one_epoch(*run))
        print(
            f"| {batch} | {times['fused']:.2f} s | {times['eager']:.2f} s "
            f"| {times['eager'] / times['fused']:.2f}x |"
        )


if __name__ == "__main__":
    main()
