"""Export: every op's ATen decomposition, ONNX with both exporters (checked with
onnxruntime), and a portable torch.export program that loads where fastmlp is absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fastmlp
from fastmlp import export
from fastmlp.nn import MLP, FusedLinearReLU


def _fused_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("fastmlp.")
    ]


def _models() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("mlp", MLP().eval(), torch.rand(5, 1, 28, 28)),
        ("3-d input, no bias", FusedLinearReLU(7, 3, bias=False).eval(), torch.randn(2, 4, 7)),
    ]


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (5,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_relu_decomposition_matches_the_op(shape: tuple[int, ...], bias: bool) -> None:
    x, w = torch.randn(*shape, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    (entry,) = [e for e in export.OPS if e.name == "fastmlp::linear_relu"]
    torch.testing.assert_close(entry.decomposition(x, w, b), fastmlp.linear_relu(x, w, b))


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_linear_relu_backward_decomposition_matches_the_op(mask: tuple[bool, ...]) -> None:
    x, w = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y = fastmlp.linear_relu(x, w, torch.randn(4, dtype=torch.float64))
    grad_y = torch.randn_like(y)
    (entry,) = [e for e in export.OPS if e.name == "fastmlp::linear_relu_backward"]
    got = entry.decomposition(grad_y, y, x, w, list(mask))
    want = torch.ops.fastmlp.linear_relu_backward(grad_y, y, x, w, list(mask))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_every_table_entry_is_registered() -> None:
    from torch._decomp import decomposition_table

    for entry in export.OPS:
        assert decomposition_table[entry.overload] is entry.decomposition, entry.name
        assert entry.overload in export.decompositions(), entry.name


def test_portable_program_has_only_aten_ops() -> None:
    model, x = MLP().eval(), torch.rand(3, 1, 28, 28)
    ep = torch.export.export(model, (x,))
    assert _fused_ops(ep.graph_module)  # the fused op is in the exported graph
    p = export.portable(ep)
    assert _fused_ops(p.graph_module) == []
    torch.testing.assert_close(p.module()(x), model(x))


@pytest.mark.slow
def test_portable_pt2_loads_where_fastmlp_is_absent(tmp_path: Path) -> None:
    model, x = MLP().eval(), torch.rand(3, 1, 28, 28)
    path = tmp_path / "mlp.pt2"
    torch.export.save(export.portable(torch.export.export(model, (x,))), path)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    child = textwrap.dedent(
        f"""
        import sys
        sys.modules["fastmlp"] = None  # `import fastmlp` now fails: fastmlp is absent
        import torch
        try:
            import fastmlp
        except ImportError:
            pass
        else:
            raise SystemExit("fastmlp was importable")
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(ep.module()(io["x"]), io["y"])
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr


@pytest.mark.slow
def test_unportable_pt2_fails_where_fastmlp_is_absent(tmp_path: Path) -> None:
    # The contrast that makes the test above meaningful: without portable() the program
    # names fastmlp's op and cannot load without the extension.
    model, x = MLP().eval(), torch.rand(3, 1, 28, 28)
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    child = (
        "import sys; sys.modules['fastmlp'] = None; import torch; "
        f"ep = torch.export.load({str(path)!r}); ep.module()(torch.rand(3, 1, 28, 28))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("case", range(2), ids=["mlp", "3d-no-bias"])
def test_onnx_export_matches_pytorch(tmp_path: Path, dynamo: bool, case: int) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    _, model, x = _models()[case]
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, verbose=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Relu" in ops and ops & {"Gemm", "MatMul"}, ops
    assert not any("fastmlp" in o or "linear_relu" in o for o in ops), ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_portable_program_exported_without_grad() -> None:
    # Exported under no_grad, the model's graph holds mlp_inference (nothing saved),
    # which portable() must replace by ATen ops as it does mlp.
    model, x = MLP((6, 9, 4), activation="gelu").eval(), torch.rand(3, 6)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
    assert _fused_ops(ep.graph_module) == ["fastmlp.mlp_inference.default"]
    p = export.portable(ep)
    assert _fused_ops(p.graph_module) == []
    with torch.no_grad():
        torch.testing.assert_close(p.module()(x), model(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_mlp_decompositions_match_the_ops(bias: bool, lead: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    sizes = (6, 9, 7, 4)
    x = torch.randn(*lead, sizes[0], dtype=torch.float64)
    weights = [
        torch.randn(o, i, dtype=torch.float64) for i, o in zip(sizes, sizes[1:], strict=False)
    ]
    biases = [torch.randn(o, dtype=torch.float64) for o in sizes[1:]] if bias else []
    entries = {e.name: e for e in export.OPS}
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases)
    y_d, hidden_d = entries["fastmlp::mlp"].decomposition(x, weights, biases)
    torch.testing.assert_close(y_d, y)
    for a, b in zip(hidden_d, hidden, strict=True):
        torch.testing.assert_close(a, b)
    grad_y = torch.randn_like(y)
    n = len(weights)
    for mask in (
        [True] * (1 + (2 if bias else 1) * n),
        [False, True] + [False] * (n - 1 + (n if bias else 0)),
    ):
        want = torch.ops.fastmlp.mlp_backward(grad_y, x, weights, hidden, mask)
        got = entries["fastmlp::mlp_backward"].decomposition(grad_y, x, weights, hidden, mask)
        torch.testing.assert_close(got[0], want[0])
        for a, b in zip(got[1] + got[2], want[1] + want[2], strict=True):
            torch.testing.assert_close(a, b)


# --- every activation (issue 23) -------------------------------------------------------

KINDS = [(a, 0.01) for a in fastmlp.ops.ACTIVATIONS] + [("leaky_relu", -0.3)]
KIND_IDS = [a if s == 0.01 else f"{a}{s}" for a, s in KINDS]
# The standard ONNX ops each activation must become (Gelu, or its decomposition through
# Erf / Tanh where the opset has no Gelu; SiLU is x * Sigmoid(x)).
ONNX_OPS = {
    "relu": [{"Relu"}],
    "leaky_relu": [{"LeakyRelu"}],
    "tanh": [{"Tanh"}],
    "sigmoid": [{"Sigmoid"}],
    "none": [set()],
    "gelu": [{"Gelu"}, {"Erf"}],
    "gelu_tanh": [{"Gelu"}, {"Tanh"}],
    "silu": [{"Sigmoid", "Mul"}],
}
ACTIVATION_OPS = {"Relu", "LeakyRelu", "Tanh", "Sigmoid", "Gelu", "Erf"}


@pytest.mark.parametrize("out", ["none", "same"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_mlp_decompositions_match_the_ops_every_activation(kind, out) -> None:
    activation, slope = kind
    acts = (activation, activation if out == "same" else "none", slope)
    torch.manual_seed(1)
    sizes = (6, 9, 7, 4)
    x = torch.randn(2, 5, sizes[0], dtype=torch.float64)
    x[0, 0, 0] = float("nan")
    weights = [
        torch.randn(o, i, dtype=torch.float64) * i**-0.5
        for i, o in zip(sizes, sizes[1:], strict=False)
    ]
    biases = [torch.randn(o, dtype=torch.float64) for o in sizes[1:]]
    entries = {e.name: e for e in export.OPS}
    y, hidden = torch.ops.fastmlp.mlp(x, weights, biases, *acts)
    y_d, hidden_d = entries["fastmlp::mlp"].decomposition(x, weights, biases, *acts)
    torch.testing.assert_close(y_d, y, equal_nan=True)
    y_i = entries["fastmlp::mlp_inference"].decomposition(x, weights, biases, *acts)
    y_op = torch.ops.fastmlp.mlp_inference(x, weights, biases, *acts)
    torch.testing.assert_close(y_i, y_op, equal_nan=True)
    torch.testing.assert_close(y_i, y, equal_nan=True)
    assert len(hidden_d) == len(hidden)
    for a, b in zip(hidden_d, hidden, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
    grad_y = torch.randn_like(y)
    for mask in ([True] * 7, [False, True, False, True, False, True, False], [False] * 7):
        want = torch.ops.fastmlp.mlp_backward(grad_y, x, weights, hidden, mask, *acts)
        got = entries["fastmlp::mlp_backward"].decomposition(
            grad_y, x, weights, hidden, mask, *acts
        )
        for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_portable_program_every_activation(kind) -> None:
    activation, slope = kind
    torch.manual_seed(2)
    model = MLP(
        (6, 9, 4), activation=activation, output_activation=activation, negative_slope=slope
    )
    x = torch.randn(3, 6)
    ep = torch.export.export(model, (x,))
    assert _fused_ops(ep.graph_module)
    p = export.portable(ep)
    assert _fused_ops(p.graph_module) == []
    torch.testing.assert_close(p.module()(x), model(x))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_onnx_export_every_activation(tmp_path: Path, dynamo: bool, kind) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    activation, slope = kind
    torch.manual_seed(3)
    # Two runs: a 3-layer one and a single Linear + activation (the per-layer op).
    model = fastmlp.fuse(
        torch.nn.Sequential(
            *MLP(
                (6, 9, 7, 5),
                activation=activation,
                output_activation=activation,
                negative_slope=slope,
            ).linear_relu_stack,
            torch.nn.Softplus(),
            *MLP((5, 4), output_activation=activation, negative_slope=slope).linear_relu_stack,
        )
    ).eval()
    assert len(model.runs()) == (1 if activation == "none" else 2)
    x = torch.randn(3, 6)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, verbose=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not any("fastmlp" in o or "linear_relu" in o or "mlp" in o for o in ops), ops
    assert ops & {"Gemm", "MatMul"}, ops
    found = ops & (ACTIVATION_OPS | {"Mul"})
    assert any(want <= found for want in ONNX_OPS[activation]), (activation, ops)
    if activation == "none":
        assert not (ops & ACTIVATION_OPS), ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
