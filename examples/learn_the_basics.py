"""PyTorch's "Learn the Basics" tutorial, section by section, done the fastmlp way.

Each section prints a little, like the tutorial, and writes its figures into --out
instead of opening windows. ``--quick`` keeps everything to a few seconds (CI runs it);
without it, section 6 trains the documented recipe to ~90% test accuracy.

    python examples/learn_the_basics.py --quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import Lambda, ToTensor

import fastmlp
from fastmlp.workflow import checkpoint, data, plots
from fastmlp.workflow.loader import DeviceLoader
from fastmlp.workflow.train import TrainConfig, fit, resolve_device, test_loop, train_loop


def section(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * (60 - len(title))}")


def tensors(device: torch.device) -> None:
    section("1. Tensors")
    x_data = torch.tensor([[1, 2], [3, 4]])
    x_rand = torch.rand_like(x_data, dtype=torch.float)
    print(f"x_data:\n{x_data}\nrand_like:\n{x_rand}")
    tensor = torch.ones(4, 4, device=device)
    tensor[:, 1] = 0
    print(f"on {tensor.device}: {tensor.sum().item()} = sum of ones with one zeroed column")
    # fastmlp's whole dataset is a tensor too: one uint8 block, moved to the device once.


def datasets_and_loaders(root: str | None, out: Path, device: torch.device, quick: bool) -> None:
    section("2. Datasets & DataLoaders")
    # No download=True / root="data": fastmlp finds the files (FASTMLP_DATA, ~/.cache,
    # the Debian package) and validates them once.
    training_data = data.FashionMNIST(root, train=True, transform=ToTensor())
    test_data = data.FashionMNIST(root, train=False, transform=ToTensor())
    print(f"{len(training_data)} training and {len(test_data)} test images")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(training_data), (9,), generator=g)
    imgs = torch.stack([training_data[int(i)][0] for i in idx])
    titles = [data.labels_map[training_data[int(i)][1]] for i in idx]
    print("3x3 sample grid:", plots.save_samples(imgs, titles, out / "samples.png"))
    # The tutorial's DataLoader works unchanged on this Dataset ...
    loader = torch.utils.data.DataLoader(training_data, batch_size=64, shuffle=True)
    t0 = time.perf_counter()
    n = 0
    for X, _ in loader:
        n += len(X)
        if quick and n >= 6400:
            break
    slow = (time.perf_counter() - t0) / n
    # ... but the fast path keeps the whole split on the device and gathers batches.
    fast_loader = DeviceLoader(
        training_data.data, training_data.targets, batch_size=64, shuffle=True, device=device
    )
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in fast_loader)
    if device.type == "cuda":
        torch.cuda.synchronize()  # batches are produced asynchronously on the GPU
    fast = (time.perf_counter() - t0) / n
    train_features, train_labels = next(iter(fast_loader))
    print(f"Feature batch shape: {train_features.size()}")
    print(f"Labels batch shape: {train_labels.size()}")
    print(f"DataLoader: {1e6 * slow:.1f} us/image, DeviceLoader: {1e6 * fast:.2f} us/image")


def transforms(root: str | None) -> None:
    section("3. Transforms")
    ds = data.FashionMNIST(
        root,
        train=True,
        transform=ToTensor(),
        target_transform=Lambda(
            lambda y: torch.zeros(10, dtype=torch.float).scatter_(0, torch.tensor(y), value=1)
        ),
    )
    img, target = ds[0]
    print(f"ToTensor: {img.dtype} {tuple(img.shape)} in [{img.min():.0f}, {img.max():.0f}]")
    print(f"one-hot target: {target}")
    # DeviceLoader applies ToTensor's scaling once to the whole split instead of per item.


def build_model(device: torch.device) -> nn.Module:
    section("4. Build the model")
    print(f"Using {device} device")
    model = fastmlp.MLP().to(device)  # the tutorial's NeuralNetwork, hidden layers fused
    print(model)
    X = torch.rand(1, 28, 28, device=device)
    logits = model(X)
    pred_probab = nn.Softmax(dim=1)(logits)
    print(f"Predicted class: {pred_probab.argmax(1)}")
    print("state_dict keys:", ", ".join(model.state_dict()))
    return model


def autograd() -> None:
    section("5. Autograd")
    x, y = torch.ones(5), torch.zeros(3)
    w = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    loss = nn.functional.binary_cross_entropy_with_logits(torch.matmul(x, w) + b, y)
    loss.backward()
    print(f"w.grad:\n{w.grad}\nb.grad: {b.grad}")
    # The fused op is an ordinary autograd op: same gradients as Linear followed by ReLU.
    layer = fastmlp.FusedLinearReLU(5, 3)
    inp = torch.randn(4, 5, requires_grad=True)
    layer(inp).sum().backward()
    fused_grad = inp.grad.clone()
    inp.grad = None
    torch.relu(nn.functional.linear(inp, layer.weight, layer.bias)).sum().backward()
    print(f"fused grad == reference grad: {torch.allclose(fused_grad, inp.grad)}")


def optimization(
    model: nn.Module, root: str | None, out: Path, device: torch.device, quick: bool
) -> nn.Module:
    section("6. Optimization")
    train_x, train_y = data.load_split(True, root)
    test_x, test_y = data.load_split(False, root)
    if quick:
        train_x, train_y = train_x[:6400], train_y[:6400]
    # The tutorial's loop and hyperparameters (SGD, lr 1e-3, batch 64), fed from the device.
    train_loader = DeviceLoader(train_x, train_y, 64, shuffle=True, device=device)
    test_loader = DeviceLoader(test_x, test_y, 1000, device=device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    print("Epoch 1\n-------------------------------")
    t0 = time.perf_counter()
    train_loop(train_loader, model, loss_fn, optimizer)
    print(f"({time.perf_counter() - t0:.1f} s for the epoch)")
    test_loop(test_loader, model, loss_fn)
    # Better settings than the tutorial's: the documented recipe (see TrainConfig).
    cfg = TrainConfig(device=str(device), data=root)
    if quick:
        cfg = TrainConfig(epochs=3, train_samples=6400, device=str(device), data=root)
    print(
        f"fit() with the recipe: {cfg.optimizer}, lr {cfg.lr}, {cfg.schedule}, "
        f"label smoothing {cfg.label_smoothing}, {cfg.epochs} epoch(s)"
    )
    # The walkthrough rewrites all its outputs on every run, this folder's run included.
    result = fit(cfg, out / "run", overwrite=True, log=None, progress=False)
    last = result.epochs[-1]
    print(
        f"test accuracy {100 * last['test_accuracy']:.1f}% after {last['epoch']} epoch(s), "
        f"{last['seconds']:.1f} s/epoch; outputs in {out / 'run'}"
    )
    return result.model


def save_and_load(model: nn.Module, out: Path) -> None:
    section("7. Save and load the model")
    torch.save(model.state_dict(), out / "model_weights.pth")
    model2 = fastmlp.MLP()
    model2.load_state_dict(torch.load(out / "model_weights.pth", weights_only=True))
    model2.eval()
    print("weights reloaded into a fresh MLP")
    # fit() checkpoints are safe to load and their "model" entry is a plain state_dict:
    # the tutorial's NeuralNetwork (nn.Linear + nn.ReLU, same names) loads it directly.
    best = checkpoint.load_checkpoint(out / "run" / "best.pt")
    plain = fastmlp.unfuse(fastmlp.MLP())
    plain.load_state_dict(best["model"])
    print(
        f"best.pt (epoch {best['epoch']}) loaded into plain PyTorch layers:",
        type(plain.linear_relu_stack[0]).__name__,
    )
    # Whole-model save works with fastmlp installed; loading it runs pickled code, so
    # fastmlp refuses unless told the file is trusted.
    torch.save(model, out / "model.pth")
    try:
        checkpoint.load_checkpoint(out / "model.pth")
    except checkpoint.UnsafeCheckpointError as e:
        print("refused by default:", str(e).split(";")[0])
    whole = checkpoint.load_checkpoint(out / "model.pth", trusted=True)
    print(f"trusted whole-model load: {type(whole).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast version (for CI)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: search)")
    parser.add_argument("--out", default="runs/learn_the_basics", help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    tensors(device)
    datasets_and_loaders(args.data, out, device, args.quick)
    transforms(args.data)
    model = build_model(device)
    autograd()
    model = optimization(model, args.data, out, device, args.quick)
    save_and_load(model, out)
    print("\nDone!")


if __name__ == "__main__":
    main()
