"""fastmlp: fast multilayer perceptrons for PyTorch.

Fused Linear+activation kernels and a whole-MLP op (C++ for the CPU, CUDA for the GPU)
registered as PyTorch ops with autograd (``fastmlp.ops``), ``nn.Module``s built on them
and ``fuse()`` for existing models (``fastmlp.nn``), a drop-in for ``apex.mlp.MLP``
(``fastmlp.apex``), ``FusedSGD`` and ``FusedAdamW`` (``FusedAdam``) that run a whole
training step as one kernel (``fastmlp.optim``), export to ONNX and portable ``.pt2``
(``fastmlp.export``), ``torch.func`` transforms of the ops (``fastmlp.transforms``), and a
fast FashionMNIST workflow (``fastmlp.workflow``: data, training, checkpoints, the ``fastmlp``
command) with its benchmarks (``fastmlp.bench``).

Three layers, one per folder (``tests/test_layering.py`` is the rule):

* ``fastmlp/`` - the library: the ops and what is built on them (``ops``, ``nn``,
  ``fusion``, ``optim``, ``export``, ``transforms``, ``engines``, ``apex``) and the few
  modules they share that need no extension (``hardware``, ``protocols``, ``testing``).
  ``import fastmlp`` loads the compiled extension, ``fastmlp._C``, which registers the
  ``torch.ops.fastmlp.*`` ops and their export and transform rules.
* ``fastmlp/workflow/`` - the Fashion-MNIST workflow (``data``, ``loader``, ``train``,
  ``checkpoint``, ``cli``, ...). It imports the library's compiled parts only inside the
  functions that build or run a model.
* ``fastmlp/bench/`` - the benchmarks' workloads (``fastmlp bench``, ``--grid``); like the
  workflow, importable without the extension.

Where the extension is missing or broken, ``import fastmlp`` still succeeds, so the
workflow's other parts (``fastmlp --help``, ``fastmlp samples``, the data checks, reading
checkpoints) keep working, and the first use of a library name (``fastmlp.MLP``,
``import fastmlp.ops``, ``fastmlp.workflow.train.build_model``) raises the ImportError with
the build instructions.
"""

from __future__ import annotations

import os as _os
from typing import Any

import torch  # noqa: F401  (loads libtorch, which the extension links against)

# A plain literal: setuptools reads it without importing the package (pyproject.toml).
__version__ = "0.1.0"

__all__ = [
    "MLP",
    "cuda_engine_report",
    "engines",
    "FusedAdam",
    "FusedAdamW",
    "FusedLinearReLU",
    "FusedSGD",
    "fuse",
    "unfuse",
    "linear_relu",
    "linear_act",
    "export",
    "mlp",
    "nn",
    "ops",
    "optim",
    "transforms",
    "__version__",
]

# Why the extension failed to load, or None when it loaded.
_extension_error: ImportError | None = None

try:
    from fastmlp import _C  # noqa: F401  (registers torch.ops.fastmlp.*)
except ImportError as exc:  # pragma: no cover - depends on the install
    _extension_error = exc
else:
    # Not fastmlp.engines: `python -m fastmlp.engines` imports this package first, and runpy
    # warns ("found in sys.modules ... unpredictable behaviour") when that imported the
    # module it is about to run. __getattr__ below imports it on first use.
    from fastmlp import export, nn, ops, optim, transforms
    from fastmlp.nn import MLP, FusedLinearReLU, fuse, unfuse
    from fastmlp.ops import linear_act, linear_relu, mlp
    from fastmlp.optim import FusedAdam, FusedAdamW, FusedSGD

    # The CPU paths `fastmlp tune` measured on this machine (never raises: an unusable
    # cache file is ignored with a warning). Not with FASTMLP_CPU_TUNE=off: the rule only.
    if _os.environ.get("FASTMLP_CPU_TUNE") != "off":
        from fastmlp import path_cache as _path_cache

        _path_cache.load()

# Names that exist only with the extension: `_C` itself (so that the library modules'
# `from fastmlp import _C` reports the build instructions too) and the library's names.
_NEEDS_EXTENSION = frozenset(["_C", *(n for n in __all__ if n != "__version__")])


# Imported on first use (PEP 562), not by `import fastmlp` (see above): name -> its module.
_LAZY = {"engines": "fastmlp.engines", "cuda_engine_report": "fastmlp.engines"}


def __getattr__(name: str) -> Any:
    """Only reached for names that are not set (PEP 562): the lazy names of ``_LAZY``, and
    the library's names when the extension failed to load: raise why, with the way to fix
    it."""
    if name in _NEEDS_EXTENSION and _extension_error is not None:
        raise ImportError(
            f"fastmlp.{name} needs fastmlp's compiled extension (fastmlp._C), which could "
            f"not be loaded: {_extension_error}. Build it with "
            "`pip install --no-build-isolation -e .` in an environment that has the torch "
            "you run with (see README.md)."
        ) from _extension_error
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if name == "engines" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastmlp' has no attribute {name!r}")
