"""Modules built on the fused ops: FusedLinearReLU, FusedSequential, MLP (with a choice
of activation), and fuse()/unfuse().

Everything here keeps plain PyTorch's parameter names and state_dict keys, so
checkpoints move freely between fastmlp models and ordinary ``nn.Linear`` /
``nn.ReLU`` models (the tutorial's ``NeuralNetwork`` included).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NoReturn, cast

import torch
from torch import nn

# _FusableRun stays importable from here: pickles of a FusedSequential hold its plan.
from fastmlp.fusion import (
    _DEFAULT_SLOPE,
    _FusableRun,
    _plan,
    activation_module,
    global_hooks,
    why_not_plain,
)
from fastmlp.ops import _check_sizes, check_activation, linear_relu

__all__ = [
    "FusedLinearReLU",
    "FusedSequential",
    "MLP",
    "activation_module",
    "describe_fusion",
    "fuse",
    "unfuse",
]

logger = logging.getLogger(__name__)


def _refuse_script(module: nn.Module) -> NoReturn:
    """torch.jit.script calls ``__prepare_scriptable__`` on every module it compiles: fail
    there with one clear line instead of a TorchScript error deep in fastmlp's code."""
    raise RuntimeError(
        f"torch.jit.script cannot compile fastmlp's {type(module).__name__} (TorchScript does "
        "not support its forward); use torch.export.export (fastmlp.export.portable makes the "
        "program load without fastmlp) or torch.jit.trace(model, example_input)"
    )


class FusedLinearReLU(nn.Linear):
    """``nn.Linear`` followed by ReLU, computed by one fused kernel.

    Same constructor, parameters, initialisation and state_dict keys as
    ``nn.Linear``; ``forward`` returns ``relu(x @ weight.T + bias)``. Works under
    ``torch.func`` transforms (:mod:`fastmlp.transforms`). ``torch.jit.script`` refuses
    it with a clear error; ``torch.jit.trace`` and ``torch.export`` work.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_relu(input, self.weight, self.bias)

    def __prepare_scriptable__(self) -> nn.Module:
        _refuse_script(self)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activation=relu (fused)"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FusedLinearReLU:
        """A FusedLinearReLU that shares ``linear``'s parameters (no copy)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = linear.in_features
        fused.out_features = linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        fused.train(linear.training)
        return fused

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's parameters (follow it with nn.ReLU)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features = self.in_features
        linear.out_features = self.out_features
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` that computes each run of ``Linear`` (+ activation) children
    (see :func:`fuse`) as one whole-MLP op (:func:`fastmlp.ops.mlp`, one autograd node)
    and every other child as usual.

    Its children, their names and so the state_dict keys are those of the Sequential it
    was made from: :func:`fuse` turns an ``nn.Sequential`` into one in place and
    :func:`unfuse` turns it back. A child with hooks (forward, pre-forward or backward:
    ``torch.nn.utils.prune``, ``weight_norm`` and ``spectral_norm`` use them) or with a
    ``forward`` replaced on the instance is not fused, so what it does still happens; the
    plan is made again when a child, its hooks or an activation's or Dropout's setting
    change.
    ``torch.func`` transforms work (:mod:`fastmlp.transforms`); ``torch.jit.script``
    refuses it with a clear error (``torch.jit.trace`` and ``torch.export`` work).
    """

    # (key, plan, serving arguments): the plan made for the children as the key describes
    # them (see _plan_key), and when the plan is one run over every child, the arguments
    # of its mlp_inference call (see _serving_args). One attribute, so that a thread
    # never sees a plan with another plan's arguments.
    _plan_state: tuple[tuple[object, ...], list[nn.Module | _FusableRun], _ServingArgs | None]
    _plan_state = ((), [], None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            plan = _plan(self)
        else:
            _, plan, serving = self._current_plan()
            if serving is not None and not torch.is_grad_enabled() and _may_serve(input):
                return _serve(input, serving)
        for step in plan:
            input = step(input)
        return input

    def _current_plan(
        self,
    ) -> tuple[tuple[object, ...], list[nn.Module | _FusableRun], _ServingArgs | None]:
        # Children may be replaced (seq[1] = nn.Tanh()), a setting changed (LeakyReLU's
        # negative_slope, GELU's approximate, Dropout's p), a parameter re-assigned or
        # hooks added: plan again.
        key = (global_hooks(), *map(_plan_key, self._modules.values()))
        state = self._plan_state
        if key != state[0]:
            plan = _plan(self)
            state = self._plan_state = (key, plan, _serving_args(plan, len(self._modules)))
        return state

    def __prepare_scriptable__(self) -> nn.Module:
        _refuse_script(self)

    def runs(self) -> list[_FusableRun]:
        """The runs of children computed as one op each."""
        return [step for step in _plan(self) if isinstance(step, _FusableRun)]


# What an inference call of a Sequential planned as one run passes to mlp_inference:
# weights, biases, activation, output activation, negative_slope.
_ServingArgs = tuple[list[torch.Tensor], list[torch.Tensor], str, str, float]


def _serving_args(plan: list[nn.Module | _FusableRun], children: int) -> _ServingArgs | None:
    """The arguments of mlp_inference for a plan that is one run over all ``children``
    whose parameters are plain Parameters (whose identity the plan key holds), else None:
    then an inference call needs no step of the plan (the serving path, issue 33)."""
    if len(plan) != 1 or not isinstance(plan[0], _FusableRun):
        return None
    run = plan[0]
    if len(run.names) != children:
        return None
    params = [lin._parameters for lin in run.linears]
    weights = [p.get("weight") for p in params]
    biases = [p.get("bias") for p in params]
    if any(w is None for w in weights) or (
        biases[0] is not None and any(b is None for b in biases)
    ):
        return None
    bias_list = [] if biases[0] is None else cast(list[torch.Tensor], biases)
    return (
        cast(list[torch.Tensor], weights),
        bias_list,
        run.activation,
        run.output_activation,
        run.negative_slope,
    )


def _may_serve(x: torch.Tensor) -> bool:
    """Whether an inference call on ``x`` may go straight to mlp_inference: a plain tensor
    (not an FX proxy or a tensor subclass with behaviour of its own), nothing recording the
    call (torch.jit.trace, the TorchScript ONNX exporter) and no autocast (fastmlp.ops.mlp
    casts)."""
    return (
        type(x) is torch.Tensor
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled(x.device.type)
    )


def _serve(x: torch.Tensor, args: _ServingArgs) -> torch.Tensor:
    weights, biases, activation, output_activation, negative_slope = args
    return torch.ops.fastmlp.mlp_inference.default(
        x, weights, biases, activation, output_activation, negative_slope
    )


def _plan_key(m: nn.Module) -> tuple[object, ...]:
    # What planning reads of a child (fusion._run_at): the module, the setting of the
    # classes that have one (LeakyReLU's negative_slope, GELU's approximate, Dropout's p),
    # and whether it has hooks or a forward of its own (fusion.why_not_plain: a hook added
    # after the first call unfuses its module). No getattr of a name a module may lack: it
    # goes through Module.__getattr__'s AttributeError, 1.5 us per module and call, most
    # of a batch-1 forward's overhead (why_not_plain reads __dict__).
    hooked = why_not_plain(m) is not None
    kind = type(m)
    if kind is nn.Linear:
        # Its parameters by identity (a re-assigned one makes new serving arguments). Ids,
        # not the tensors, which compare elementwise; an id cannot be reused while the
        # serving arguments made with it hold its tensor.
        params = m._parameters
        return m, (id(params.get("weight")), id(params.get("bias"))), hooked
    if kind is nn.LeakyReLU:
        return m, m.negative_slope, hooked
    if kind is nn.GELU:
        return m, m.approximate, hooked
    if kind is nn.Dropout:
        return m, m.p, hooked
    return m, None, hooked


# --- How fuse() changes a module's class at run time ----------------------------------
# fuse() does not build new modules: it reassigns ``seq.__class__`` of each fusable
# Sequential, so children, parameters, hooks and state_dict keys stay exactly where they
# were, and unfuse() reassigns it back. Three pieces make that work:
#
# * _fused_class(cls): the class a Sequential of class ``cls`` becomes. A plain
#   nn.Sequential becomes FusedSequential. A subclass that keeps Sequential's forward
#   (torchvision.ops.MLP) becomes a class made on first use, deriving from FusedSequential
#   and ``cls`` (so isinstance(m, cls) still holds and its other methods stay), recording
#   ``cls`` as ``_unfused``, and stored in this module's globals under a name that encodes
#   ``cls``'s module and qualname ("_Fused__torchvision_o_ops_o_misc:MLP"). Its repr name
#   is "Fused" + the original name; one class per ``cls``, made once.
# * the module-level __getattr__: pickle (torch.save of a whole fused model) records that
#   class as fastmlp.nn.<encoded name>; in a fresh process the name is not in globals yet,
#   so __getattr__ decodes it, imports ``cls`` and makes the class with _fused_class.
# * _unfused_class(module): the class unfuse() restores, ``_unfused`` (nn.Sequential for
#   FusedSequential itself).
# Sequentials with their own forward are never fused: what they compute is unknown.
_FUSED_PREFIX = "_Fused__"


def _fused_class(cls: type) -> type:
    """The class a Sequential of class ``cls`` becomes under fuse() (see the comment block
    above: "How fuse() changes a module's class at run time")."""
    if cls is nn.Sequential or issubclass(cls, FusedSequential):
        return FusedSequential
    name = _FUSED_PREFIX + (cls.__module__ + ":" + cls.__qualname__).replace(".", "_o_")
    fused = globals().get(name)
    if fused is None:
        fused = type(name, (FusedSequential, cls), {"__module__": __name__, "_unfused": cls})
        fused.__name__ = "Fused" + cls.__name__  # what repr() shows; pickle uses __qualname__
        globals()[name] = fused
    return fused


def __getattr__(name: str) -> type:
    """Makes the fused classes of pickled models on lookup (see "How fuse() changes a
    module's class at run time" above)."""
    if name.startswith(_FUSED_PREFIX):
        module, _, qualname = name[len(_FUSED_PREFIX) :].replace("_o_", ".").partition(":")
        cls: object = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not isinstance(cls, type):  # the TypeError _fused_class's issubclass would raise
            raise TypeError(f"{name}: {module}:{qualname} is not a class")
        return _fused_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unfused_class(module: FusedSequential) -> type:
    """The class unfuse() gives ``module`` back (see "How fuse() changes a module's class
    at run time" above)."""
    return getattr(type(module), "_unfused", nn.Sequential)


class MLP(nn.Module):
    """The tutorial's ``NeuralNetwork``, computed by one whole-MLP op, with a choice of
    activation.

    ``sizes`` lists the layer widths from input to logits; every layer but the last is
    followed by ``activation`` (one of :data:`fastmlp.ops.ACTIVATIONS`: relu, gelu,
    gelu_tanh, silu, tanh, sigmoid, leaky_relu with ``negative_slope``, or none), the last
    by ``output_activation`` (``None``, the default, leaves the logits alone as the
    tutorial does). The default is the tutorial's 784-512-512-10 with ReLU. Submodules are
    the tutorial's (``flatten``, ``linear_relu_stack`` = Linear, ReLU, Linear, ReLU,
    Linear; with another activation its torch.nn module, nn.GELU, nn.SiLU, ..., takes
    ReLU's place, and "none" puts nothing between the Linears), so
    ``NeuralNetwork().load_state_dict(MLP().state_dict())`` works with ``strict=True``
    and the other way round; the stack is a :class:`FusedSequential`, so forward and
    backward run as one op each (:func:`fastmlp.ops.mlp`) and :func:`unfuse` gives the
    plain stack. :meth:`linears` lists the Linear layers.

    ``torch.func`` transforms (grad, jacrev, jacfwd, vmap, per-sample gradients
    ``vmap(grad(...))``) work and match plain PyTorch (:mod:`fastmlp.transforms`).
    ``torch.jit.script`` raises a clear error; ``torch.jit.trace``, ``torch.export`` and
    :mod:`fastmlp.export` work.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (784, 512, 512, 10),
        bias: bool = True,
        activation: str = "relu",
        output_activation: str | None = None,
        negative_slope: float = _DEFAULT_SLOPE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = _check_sizes(sizes, "sizes", op="fastmlp.MLP")
        check_activation(activation, op="fastmlp.MLP")
        if output_activation is not None:
            check_activation(output_activation, "output_activation", op="fastmlp.MLP")
        if isinstance(negative_slope, bool) or not (
            isinstance(negative_slope, (int, float)) and math.isfinite(negative_slope)
        ):
            raise ValueError(
                f"fastmlp.MLP: negative_slope must be a finite number, got {negative_slope!r}"
            )
        self.sizes = sizes
        self.activation = activation
        self.output_activation = output_activation
        self.negative_slope = float(negative_slope)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            layers.append(nn.Linear(fan_in, fan_out, bias, device=device, dtype=dtype))
            last = i == len(sizes) - 2
            act = output_activation if last else activation
            module = activation_module(act, negative_slope) if act is not None else None
            if module is not None:
                layers.append(module)
        self.flatten = nn.Flatten()
        self.linear_relu_stack = FusedSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            y = self._serve(x)
            if y is not None:
                return y
        return self.linear_relu_stack(self.flatten(x))

    def _serve(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference straight to the op when nothing in between would do anything: the
        children are the plain Flatten and FusedSequential (no hooks, nothing replaced) and
        the stack is planned as one run. A batch-1 call of a small MLP spends most of its
        time in the module calls it skips (issue 33). None: take the module calls."""
        modules = self._modules
        flatten, stack = modules.get("flatten"), modules.get("linear_relu_stack")
        if (
            type(flatten) is not nn.Flatten
            or type(stack) is not FusedSequential
            or why_not_plain(flatten) is not None
            or why_not_plain(stack) is not None
            or torch.compiler.is_compiling()
            or not _may_serve(x)
        ):
            return None
        serving = stack._current_plan()[2]
        if serving is None:
            return None
        return _serve(x.flatten(flatten.start_dim, flatten.end_dim), serving)

    def __prepare_scriptable__(self) -> nn.Module:
        _refuse_script(self)

    def extra_repr(self) -> str:
        if self.activation == "relu" and self.output_activation is None:
            return ""
        return f"activation={self.activation!r}, output_activation={self.output_activation!r}"

    def linears(self) -> list[nn.Linear]:
        """The Linear layers in order (their weights and biases are the MLP's parameters)."""
        return [m for m in self.linear_relu_stack if isinstance(m, nn.Linear)]


def fuse(module: nn.Module) -> nn.Module:
    """Make every ``nn.Sequential`` in ``module`` (itself included) compute its runs of
    ``nn.Linear`` + activation layers as one whole-MLP op each; returns ``module``,
    changed in place.

    The activations fused are exact ``nn.ReLU``, ``nn.GELU`` (both forms), ``nn.SiLU``,
    ``nn.Tanh``, ``nn.Sigmoid``, ``nn.LeakyReLU`` and ``nn.Identity`` (no activation). A
    run is two or more exact ``nn.Linear`` layers with the same activation between each
    pair (nothing or an ``nn.Identity`` counts as no activation), or one Linear followed
    by an activation; an activation right after the run's last Linear is included as its
    output activation, so a change of activation starts a new run after it. An
    ``nn.Identity`` or ``nn.Dropout(p=0)`` next to an activation is skipped
    (torchvision.ops.MLP has those). A module with hooks or a ``forward`` replaced on the
    instance is not fused (``torch.nn.utils.prune``, ``weight_norm`` and ``spectral_norm``
    recompute the weight in a hook), nor is anything while global module hooks are
    registered; a hook added later unfuses its module from the next call on. Subclasses of
    Linear or of the activations are left
    alone, as is anything else (a BatchNorm between a Linear and its ReLU ends the run).
    The Sequentials keep their children, names and parameters, so state_dict keys are
    unchanged: each becomes a :class:`FusedSequential` (a subclass of nn.Sequential, and
    of its own class when that subclasses Sequential without its own forward). Outputs are
    equal to the unfused model's up to floating-point rounding. What was fused and what
    was left is logged (logger ``fastmlp.nn``, level INFO) and returned by
    :func:`describe_fusion`.
    """
    for seq in list(module.modules()):
        if not isinstance(seq, nn.Sequential) or isinstance(seq, FusedSequential):
            continue
        if type(seq).forward is not nn.Sequential.forward or "forward" in seq.__dict__:
            continue  # a Sequential with its own forward: we cannot know what it computes
        if any(isinstance(step, _FusableRun) for step in _plan(seq)):
            seq.__class__ = _fused_class(type(seq))  # see "How fuse() changes a module's..."
    for line in describe_fusion(module):
        logger.info("fastmlp.fuse: %s", line)
    return module


def describe_fusion(module: nn.Module) -> list[str]:
    """One line per fused run of ``module`` and per Linear layer left unfused (and why)."""
    lines: list[str] = []
    fused: set[int] = set()
    for prefix, seq in module.named_modules():
        if isinstance(seq, FusedSequential):
            for run in seq.runs():
                fused.update(id(lin) for lin in run.linears)
                where = ".".join(filter(None, [prefix, run.names[0]]))
                last = ".".join(filter(None, [prefix, run.names[-1]]))
                one_relu = len(run.linears) == 1 and run.relu_last
                op = "fastmlp.linear_relu" if one_relu else "fastmlp.mlp"
                lines.append(f"fused {where}..{last} ({run.describe()}) into one {op} op")
    for prefix, seq in module.named_modules():
        children = list(seq._modules.items())
        # What fuse() would fuse in a Sequential it has not been applied to.
        fusable: set[int] = set()
        if isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward:
            for step in _plan(seq):
                if isinstance(step, _FusableRun):
                    fusable.update(id(lin) for lin in step.linears)
        for i, (name, child) in enumerate(children):
            if not isinstance(child, nn.Linear) or id(child) in fused:
                continue
            where = ".".join(filter(None, [prefix, name]))
            plain = why_not_plain(child)
            if type(child) is not nn.Linear:
                why = f"a {type(child).__name__}, not an exact nn.Linear"
            elif plain is not None:
                why = f"{plain}, which the fused op would skip"
            elif global_hooks():
                why = "global module hooks are registered, which the fused op would skip"
            elif not isinstance(seq, nn.Sequential):
                why = f"inside a {type(seq).__name__}, not an nn.Sequential"
            elif (
                not isinstance(seq, FusedSequential)
                and type(seq).forward is not nn.Sequential.forward
            ):
                why = f"inside {type(seq).__name__}, which has its own forward"
            elif id(child) in fusable:
                why = "fusable, but fuse() has not been applied to it"
            elif i + 1 < len(children):
                following = children[i + 1][1]
                if type(following) is nn.Linear:
                    has = "with" if following.bias is not None else "without"
                    why = f"followed by a Linear {has} bias (a run needs all or none)"
                elif why_not_plain(following) is not None:
                    name = type(following).__name__
                    why = f"followed by {name}, and {why_not_plain(following)}"
                else:
                    why = f"followed by {type(following).__name__}, not an activation fuse() knows"
            else:
                why = "last in its Sequential, no activation after it"
            lines.append(f"left {where} ({why})")
    return lines


def unfuse(module: nn.Module) -> nn.Module:
    """Undo :func:`fuse` exactly, and turn FusedLinearReLU layers back into plain
    ``nn.Linear`` + ``nn.ReLU`` (sharing parameters), for export where the extension is
    not installed. Returns a new top-level module if ``module`` itself is a
    FusedLinearReLU, else ``module`` changed in place.

    A FusedSequential (from :func:`fuse`, or an :class:`MLP`'s stack) becomes the plain
    Sequential class it was, with the same children. In a Sequential, a FusedLinearReLU
    becomes Linear, ReLU (taking the slot of an ``nn.Identity`` right after it, if any);
    an MLP's stack keeps the tutorial's indices 0..4.
    """
    if isinstance(module, FusedLinearReLU):
        return nn.Sequential(module.to_linear(), nn.ReLU())
    for child in list(module.modules()):
        if isinstance(child, FusedSequential):
            child.__class__ = _unfused_class(child)  # fuse()'s class change, undone
            for cached in ("_plan_state", "_plan_key", "_plan_cache"):  # (older versions')
                child.__dict__.pop(cached, None)
        if isinstance(child, nn.Sequential):
            _unfuse_sequential(child)
        else:
            for name, sub in list(child._modules.items()):
                if isinstance(sub, FusedLinearReLU):
                    child._modules[name] = nn.Sequential(sub.to_linear(), nn.ReLU())
    return module


def _unfuse_sequential(seq: nn.Sequential) -> None:
    """Replaces, in place, each FusedLinearReLU child of ``seq`` by Linear, ReLU."""
    if not any(isinstance(m, FusedLinearReLU) for m in seq._modules.values()):
        return
    items = list(seq._modules.items())
    out: list[tuple[str, nn.Module]] = []
    skip_next = False
    for i, (name, sub) in enumerate(items):
        if skip_next:
            skip_next = False
            continue
        if not isinstance(sub, FusedLinearReLU):
            out.append((name, sub))
            continue
        out.append((name, sub.to_linear()))
        following = items[i + 1] if i + 1 < len(items) else None
        if following is not None and type(following[1]) is nn.Identity:
            out.append((following[0], nn.ReLU()))  # the slot an older fuse() emptied
            skip_next = True
        else:
            out.append((_relu_name(name, seq), nn.ReLU()))
    seq._modules.clear()
    seq._modules.update(OrderedDict(out))


def _relu_name(linear_name: str, seq: nn.Sequential) -> str:
    # A stack named 0, 2, 4: the ReLUs go back to 1, 3 as in the tutorial.
    if linear_name.isdigit() and str(int(linear_name) + 1) not in seq._modules:
        return str(int(linear_name) + 1)
    return f"{linear_name}_relu"
