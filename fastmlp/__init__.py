"""fastmlp: fast multilayer perceptrons for PyTorch.

Fused Linear+ReLU kernels and a whole-MLP op (C++ for the CPU, CUDA for the GPU)
registered as PyTorch ops with autograd (``fastmlp.ops``), ``nn.Module``s built on them
and ``fuse()`` for existing models (``fastmlp.nn``), ``FusedSGD`` that runs a whole
training step as one kernel (``fastmlp.optim``), export to ONNX and portable ``.pt2``
(``fastmlp.export``), and a fast FashionMNIST workflow (``fastmlp.data``,
``fastmlp.train``, ``fastmlp.checkpoint``, the ``fastmlp`` command).
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from fastmlp import _C  # noqa: F401  (registers torch.ops.fastmlp.*)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "fastmlp's compiled extension (fastmlp._C) could not be loaded: "
        f"{exc}. Build it with `pip install --no-build-isolation -e .` in an "
        "environment that has the torch you run with (see README.md)."
    ) from exc

from fastmlp import engines, export, nn, ops, optim  # noqa: E402
from fastmlp.engines import cuda_engine_report  # noqa: E402
from fastmlp.nn import MLP, FusedLinearReLU, fuse, unfuse  # noqa: E402
from fastmlp.ops import linear_relu, mlp  # noqa: E402
from fastmlp.optim import FusedSGD  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "cuda_engine_report",
    "engines",
    "FusedLinearReLU",
    "FusedSGD",
    "fuse",
    "unfuse",
    "linear_relu",
    "export",
    "mlp",
    "nn",
    "ops",
    "optim",
    "__version__",
]
