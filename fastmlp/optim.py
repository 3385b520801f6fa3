"""``FusedSGD``: torch.optim.SGD that can run a whole MLP training step as one kernel.

``FusedSGD(model, lr=...)`` *is* a ``torch.optim.SGD`` over the model's parameters: its
``step()``, ``zero_grad()``, ``state_dict()``, learning-rate schedulers and checkpoints
behave exactly as SGD's, and its momentum buffers live in ``state[p]["momentum_buffer"]``
as SGD's do, so a run can switch between the two at any step.

What it adds is :meth:`FusedSGD.train_step`: forward, cross-entropy, backward and the SGD
update of a :class:`fastmlp.MLP` in one call of the ``fastmlp::mlp_sgd_step`` CPU kernel,
without autograd, ``.grad`` tensors or a separate optimizer pass. It applies when the model
and batch are on the CPU in float32/float64, also under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` (bfloat16 GEMMs on copies of the float32 parameters, which are
updated in float32, as autocast does), and falls back to the ordinary autograd step
otherwise (a GPU, another autocast dtype, a model wrapped in DDP, an MLP with another
activation than ReLU or with an output activation: the kernel is ReLU only), so
``train_step`` is always correct to call.

:class:`FusedAdamW` and :class:`FusedAdam` are the same for ``torch.optim.AdamW`` and
``torch.optim.Adam``, with the ``fastmlp::mlp_adamw_step`` kernel (amsgrad included); their
state is torch's (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``, with amsgrad
``max_exp_avg_sq``), so a checkpoint moves between them and torch's optimizers either way.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from fastmlp import _C  # noqa: F401  (registers torch.ops.fastmlp.mlp_sgd_step, ...)
from fastmlp.fusion import global_hooks, why_not_plain

if TYPE_CHECKING:  # the library imports nothing of the workflow layer at run time
    from fastmlp.protocols import LossClosure, LossFn, StepFn

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "mlp_linears"]

_UNSUPPORTED = object()  # an autocast state the fused kernel does not implement
_DEFAULT_IGNORE_INDEX = nn.CrossEntropyLoss().ignore_index  # -100


def mlp_linears(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``model`` in order if it is an MLP the fused step can run
    (flatten, then Linear layers with a ReLU after every one but the last); else ``None``,
    also for a :class:`fastmlp.MLP` with another activation or an output activation (the
    kernel computes ReLU only; those train with the autograd step).

    * A :class:`fastmlp.MLP` is one by construction: its :meth:`~fastmlp.MLP.linears`,
      provided its documented layout still holds (``flatten`` an ``nn.Flatten()``, the
      ``linear_relu_stack`` Linear, ReLU, ..., Linear: a user may have edited either)
      and its class keeps MLP's ``forward``.
    * Any other module's ``forward`` cannot be inspected, so only the tutorial's
      ``NeuralNetwork`` is taken for one, recognised by its layout: exactly the two
      children ``flatten`` (an ``nn.Flatten()``) and ``linear_relu_stack`` (an
      ``nn.Sequential`` of the layers above, fused or not), whose forward the tutorial
      defines as ``linear_relu_stack(flatten(x))``. A class with that layout and another
      forward would be misread: give it another layout, or train it with plain SGD.
    """
    from fastmlp.nn import MLP

    if isinstance(model, MLP):
        if type(model).forward is not MLP.forward:  # a subclass computing something else
            return None
        linears = _layout_linears(model.flatten, model.linear_relu_stack)
        return model.linears() if linears is not None else None
    if set(model._modules) != {"flatten", "linear_relu_stack"}:
        return None
    return _layout_linears(model.flatten, model.linear_relu_stack)


def _layout_linears(flatten: object, stack: object) -> list[nn.Linear] | None:
    """The Linear layers of ``stack`` if ``flatten`` then ``stack`` compute the MLP the
    fused kernel runs, with all layers biased or none; else ``None``."""
    from fastmlp.nn import FusedLinearReLU

    if not isinstance(flatten, nn.Flatten) or (flatten.start_dim, flatten.end_dim) != (1, -1):
        return None
    if not isinstance(stack, nn.Sequential):
        return None
    linears: list[nn.Linear] = []
    relu_after: list[bool] = []
    for sub in stack:
        if isinstance(sub, FusedLinearReLU):
            linears.append(sub)
            relu_after.append(True)
        elif type(sub) is nn.Linear:
            linears.append(sub)
            relu_after.append(False)
        elif type(sub) is nn.ReLU and relu_after and not relu_after[-1]:
            relu_after[-1] = True
        elif not isinstance(sub, nn.Identity):  # an older fuse() left Identity in ReLU's slot
            return None
    if not linears or relu_after != [True] * (len(linears) - 1) + [False]:
        return None
    has_bias = {lin.bias is not None for lin in linears}
    return linears if len(has_bias) == 1 else None


def _identity(params: list[torch.Tensor]) -> list[tuple[int, int]]:
    """What changes whenever a parameter's values may have: (version, storage address)."""
    return [(p._version, p.data_ptr()) for p in params]


class _FusedStep(torch.optim.Optimizer):
    """What FusedSGD, FusedAdam and FusedAdamW share: the model and the kernel's
    arguments, when the fused step applies, ``train_step``, ``train_step_for`` and the
    dispatch of ``step(closure)`` (FusedSGD's docstring says why the fused step goes
    through ``step``). A subclass calls :meth:`_fused_init` after its optimizer's
    ``__init__`` and defines :meth:`_group_allows` (the settings of its one param group
    that the kernel implements) and :meth:`_fused_step` (the kernel call)."""

    model: nn.Module

    def _checked_model(self, model: object) -> nn.Module:
        """``model``, which must be the model itself (the kernel reads its layers), not its
        parameters as other optimizers take."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), not its parameters; "
                f"got {type(model)}"
            )
        return model

    def _fused_init(self, model: nn.Module) -> None:
        self.model = model
        # The kernel's arguments, gathered once (module attribute lookups cost ~1 us each);
        # all empty when the model is not an MLP the kernel can run.
        linears = mlp_linears(model) or []
        self._linears = linears
        self._weights = [lin.weight for lin in linears]
        self._biases = (
            [lin.bias for lin in linears] if linears and linears[0].bias is not None else []
        )
        self._params = [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]
        self._copies: list[torch.Tensor] = []
        self._copies_of: list[tuple[int, int]] | None = None

    def _group_allows(self, group: dict[str, Any]) -> bool:
        """Whether the kernel implements this param group's settings."""
        raise NotImplementedError

    def _fused_step(self, closure: _CrossEntropyClosure) -> torch.Tensor:
        """The closure's whole step as one kernel call; returns the batch's loss."""
        raise NotImplementedError

    def fused_step_applies(self, x: torch.Tensor) -> bool:
        """Whether :meth:`train_step` on batch ``x`` runs the fused kernel."""
        if not self._params or len(self.param_groups) != 1:
            return False
        group = self.param_groups[0]
        weight = self._weights[0]
        params = self._params
        return (
            self._group_allows(group)
            and len(group["params"]) == len(params)
            and all(a is b for a, b in zip(group["params"], params, strict=True))
            and all(p.requires_grad for p in params)  # torch leaves frozen ones alone
            and x.dim() >= 2
            and x.device.type == "cpu"
            and weight.device.type == "cpu"
            and x.dtype == weight.dtype
            and weight.dtype in (torch.float32, torch.float64)
            and self._compute_dtype(weight.dtype) is not _UNSUPPORTED
            # prune, weight_norm and spectral_norm make a Linear's weight in a hook that
            # the kernel would skip: the autograd path runs it.
            and not global_hooks()
            and all(why_not_plain(lin) is None for lin in self._linears)
        )

    @staticmethod
    def _compute_dtype(param_dtype: torch.dtype) -> torch.dtype | None | object:
        """The GEMMs' dtype under the current autocast state: None (the parameters'),
        bfloat16 (CPU bf16 autocast of float32 parameters), or _UNSUPPORTED."""
        if not torch.is_autocast_enabled("cpu"):
            return None
        if torch.get_autocast_dtype("cpu") == torch.bfloat16 and param_dtype == torch.float32:
            return torch.bfloat16
        return _UNSUPPORTED

    def train_step_for(self, model: nn.Module, loss_fn: LossFn) -> StepFn | None:
        """The whole training step for ``train_loop(..., model, loss_fn, self)``, or ``None``
        when the loop must take its own autograd step (this makes the optimizer a
        :class:`fastmlp.protocols.TrainStepProvider`).

        It is :meth:`train_step` (with the loss's label smoothing) when ``model`` is this
        optimizer's own model, not wrapped in ``DistributedDataParallel`` (which all-reduces
        gradients between backward and update, and the fused kernel has no gradients to
        reduce), and ``loss_fn`` is a plain mean cross-entropy: an ``nn.CrossEntropyLoss``
        with ``reduction="mean"``, no class weights and the default ``ignore_index`` (-100;
        the kernel raises on a negative target where the loss would skip it, and
        Fashion-MNIST has none).
        """
        if model is not self.model or isinstance(model, nn.parallel.DistributedDataParallel):
            return None
        if (
            type(loss_fn) is not nn.CrossEntropyLoss
            or loss_fn.weight is not None
            or loss_fn.reduction != "mean"
            or loss_fn.ignore_index != _DEFAULT_IGNORE_INDEX
        ):
            return None
        return functools.partial(self.train_step, label_smoothing=loss_fn.label_smoothing)

    def train_step(
        self, x: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """One training step on ``(x, target)``; returns the batch's mean loss (0-d, detached).

        Same result, up to rounding, as::

            loss = F.cross_entropy(model(x), target, label_smoothing=label_smoothing)
            opt.zero_grad(); loss.backward(); opt.step()

        ``target`` holds class indices (int64). The fused kernel runs when
        :meth:`fused_step_applies`; otherwise exactly the code above runs.
        """
        if x.dim() == 0 or x.shape[0] == 0:
            # Cross-entropy of no samples is NaN, and its NaN gradient would poison every
            # weight: refuse instead.
            # RuntimeError, as the kernel's own check of a (0, features) batch raises.
            raise RuntimeError(
                f"{type(self).__name__}.train_step: needs a non-empty batch, got x of shape "
                f"{tuple(x.shape)}; skip empty batches"
            )
        if not self.fused_step_applies(x):
            loss = F.cross_entropy(self.model(x), target, label_smoothing=label_smoothing)
            self.zero_grad(set_to_none=True)
            loss.backward()
            self.step()
            return loss.detach()
        # Through step(), so that step hooks run and LR schedulers see a step taken.
        return self.step(_CrossEntropyClosure(self, x, target, float(label_smoothing)))

    # torch types a closure as returning float; closures return the loss tensor (its docs').
    @overload  # type: ignore[override]
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: LossClosure) -> torch.Tensor: ...
    def step(self, closure: LossClosure | None = None) -> torch.Tensor | None:
        """The optimizer's ``step``, with one dispatch on the closure's type.

        * A :class:`_CrossEntropyClosure` made for this optimizer (only :meth:`train_step`
          makes one, after checking :meth:`fused_step_applies`): its whole step (zero_grad,
          cross-entropy, backward, update) runs as one kernel, without calling it, and the
          batch's loss comes back (0-d, detached). The closure is a plain, callable
          :class:`fastmlp.protocols.LossClosure`, so any other optimizer handed it would
          just call it and get the same step through autograd.
        * Anything else (``None``, a user's closure, another optimizer's closure):
          the optimizer's own ``step(closure)`` (``torch.optim.SGD``'s, ...), unchanged.

        The type carries the batch because step hooks and LR schedulers only see
        ``step()`` calls (see FusedSGD's docstring)."""
        if not isinstance(closure, _CrossEntropyClosure) or closure.optimizer is not self:
            # SGD's and Adam's step take any closure; Optimizer's stub types one returning float.
            return super().step(closure)  # type: ignore[arg-type]
        return self._fused_step(closure)

    def _compute_copies(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """bfloat16 copies of the parameters, kept by the kernel equal to them after each
        fused step (which saves casting 535k weights per step). Made afresh whenever a
        parameter has changed otherwise since (its version counter or storage moved:
        a plain step(), load_state_dict, an in-place edit)."""
        if self._copies_of != _identity(params):
            self._copies = [p.detach().to(torch.bfloat16) for p in params]
        return self._copies


class FusedSGD(_FusedStep, torch.optim.SGD):
    """SGD for a :class:`fastmlp.MLP`, with a fused whole-step fast path.

    Args:
        model: a :class:`fastmlp.MLP` (or the tutorial's ``NeuralNetwork`` layout; see
            :func:`mlp_linears`). The optimizer covers all its parameters, in one group.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
            The fused path needs ``dampening=0`` and ``maximize=False``; other values
            always take the autograd path.

    Use :meth:`train_step` for the whole step, or the usual ``loss.backward();
    opt.step()``. The fused step leaves ``.grad`` as ``None`` (it never materialises
    gradients) and does not run module hooks; it is not taken when a Linear layer has
    hooks (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) or global module
    hooks are registered. :func:`fastmlp.workflow.loops.train_loop` asks
    :meth:`train_step_for` whether to use it.

    Why the fused step goes through ``step()``: torch runs an optimizer's step hooks, and
    an LR scheduler records that a step was taken (else it warns "``lr_scheduler.step()``
    before ``optimizer.step()``"), in wrappers it installs around ``step``; doing either
    elsewhere would need torch's private attributes (``_optimizer_step_pre_hooks``,
    ``_opt_called``). So the batch reaches ``step`` the public way, as its closure: the one
    :meth:`train_step` passes is an ordinary SGD closure (zero_grad, cross-entropy,
    backward), and ``step`` runs that whole step as one kernel instead of calling it.
    ``step`` depends on its arguments alone; no state is set around the call.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            self._checked_model(model).parameters(),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        self._fused_init(model)

    def _group_allows(self, group: dict[str, Any]) -> bool:
        return group["dampening"] == 0 and not group["maximize"]

    def _fused_step(self, closure: _CrossEntropyClosure) -> torch.Tensor:
        x, target, label_smoothing = closure.x, closure.target, closure.label_smoothing
        group = self.param_groups[0]
        params = group["params"]
        momentum = group["momentum"]
        buffers: list[torch.Tensor] = []
        if momentum != 0:
            for p in params:
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    # SGD starts the buffer at the first gradient; m * 0 + g is the same.
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.contiguous_format
                    )
                buffers.append(state["momentum_buffer"])
        for p in params:
            p.grad = None  # a fused step computes no .grad; stale ones would mislead
        compute_dtype = self._compute_dtype(params[0].dtype)
        copies = self._compute_copies(params) if compute_dtype is not None else []
        with torch.no_grad():
            loss = torch.ops.fastmlp.mlp_sgd_step(
                x.reshape(x.shape[0], -1) if x.dim() != 2 else x,
                target,
                self._weights,
                self._biases,
                buffers,
                copies,
                float(group["lr"]),
                float(momentum),
                float(group["weight_decay"]),
                bool(group["nesterov"]),
                label_smoothing,
                compute_dtype,
            )
        if copies:
            self._copies_of = _identity(params)
        return loss


class FusedAdam(_FusedStep, torch.optim.Adam):
    """Adam for a :class:`fastmlp.MLP`, with a fused whole-step fast path, as
    :class:`FusedSGD` is for SGD (its docstring tells how the fused step works and when
    it is taken; the same holds here).

    Args:
        model: a :class:`fastmlp.MLP` (or the tutorial's ``NeuralNetwork`` layout; see
            :func:`mlp_linears`). The optimizer covers all its parameters, in one group.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as
            ``torch.optim.Adam`` (weight decay is an L2 term added to the gradient unless
            ``decoupled_weight_decay``, which makes it AdamW: use :class:`FusedAdamW`).
            The fused path needs ``maximize=False`` and a float ``lr`` (not a Tensor that
            requires grad); torch's ``differentiable`` and ``capturable`` forms are not
            offered (load_state_dict of a group that has them: the autograd path).

    :meth:`train_step` runs forward, cross-entropy, backward and torch's Adam update
    (bias correction, amsgrad, the state's per-parameter ``step`` counts) as one call of
    ``fastmlp::mlp_adamw_step`` on the CPU in float32/float64, also under bf16 autocast
    (bfloat16 GEMMs; the float32 parameters and moments are updated in float32). Its
    state is ``torch.optim.Adam``'s: ``state[p]`` holds ``step`` (a 0-d tensor),
    ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), created by the
    first step of either path, and ``state_dict()`` loads into ``torch.optim.Adam`` and
    back.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        torch.optim.Adam.__init__(
            self,
            self._checked_model(model).parameters(),
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._fused_init(model)

    def _group_allows(self, group: dict[str, Any]) -> bool:
        return (
            not group["maximize"]
            and not group["differentiable"]
            and not group["capturable"]
            and not (isinstance(group["lr"], torch.Tensor) and group["lr"].requires_grad)
        )

    def _fused_step(self, closure: _CrossEntropyClosure) -> torch.Tensor:
        x, target, label_smoothing = closure.x, closure.target, closure.label_smoothing
        group = self.param_groups[0]
        params = group["params"]
        amsgrad = bool(group["amsgrad"])
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(state, p, group)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
            p.grad = None  # a fused step computes no .grad; stale ones would mislead
        beta1, beta2 = group["betas"]
        compute_dtype = self._compute_dtype(params[0].dtype)
        copies = self._compute_copies(params) if compute_dtype is not None else []
        with torch.no_grad():
            loss = torch.ops.fastmlp.mlp_adamw_step(
                x.reshape(x.shape[0], -1) if x.dim() != 2 else x,
                target,
                self._weights,
                self._biases,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                steps,
                copies,
                float(group["lr"]),
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
                bool(group["decoupled_weight_decay"]),
                amsgrad,
                label_smoothing,
                compute_dtype,
            )
        if copies:
            self._copies_of = _identity(params)
        return loss

    @staticmethod
    def _init_state(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        """The state torch.optim.Adam's first step gives ``p`` (its ``_init_group``)."""
        if group["fused"]:  # torch's fused form keeps the count as float32 on p's device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        else:  # float64 when that is the default dtype, as torch's _get_scalar_dtype()
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    """AdamW for a :class:`fastmlp.MLP`, with a fused whole-step fast path: a
    ``torch.optim.AdamW`` (decoupled weight decay, default 1e-2) whose :meth:`train_step`
    runs the whole step as one kernel, as :class:`FusedAdam`'s does (see there)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            model,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
        )


class _CrossEntropyClosure:
    """An SGD closure for one batch: clears the gradients, computes the mean cross-entropy
    of the optimizer's model on ``x`` against ``target`` and its gradients, returns the
    loss. :meth:`FusedSGD.step` runs the same step as one kernel instead of calling it;
    any other optimizer's ``step(closure)`` would call it."""

    __slots__ = ("label_smoothing", "optimizer", "target", "x")

    def __init__(
        self, optimizer: _FusedStep, x: torch.Tensor, target: torch.Tensor, label_smoothing: float
    ) -> None:
        self.optimizer = optimizer
        self.x = x
        self.target = target
        self.label_smoothing = label_smoothing

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.optimizer.model(self.x)
        loss = F.cross_entropy(logits, self.target, label_smoothing=self.label_smoothing)
        loss.backward()
        return loss
