"""fastmlp.bench.serve and ``fastmlp bench --serve`` (issue 33's serving benchmark): every
variant computes the same function, the percentiles and the table, JSON, the command's
flags. Structure, never speed: rounds are short and no time is asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fastmlp.bench import serve
from fastmlp.workflow.cli import main

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
QUICK = dict(latency_batches=(1,), throughput_batches=(5,), rounds=2, round_s=0.0)


@pytest.mark.parametrize("model", list(serve.MODELS))
def test_every_variant_computes_the_same_function(model):
    x = serve.example_input(model, 3)
    variants = ["eager", "fastmlp"] + (["onnxruntime"] if HAS_ORT else [])
    outputs = {}
    for v in variants:
        y = serve.make_call(v, model, x)()
        outputs[v] = torch.as_tensor(y[0] if isinstance(y, list) else y)
    assert outputs["eager"].shape == (3, serve.MODELS[model][-1])
    for v, y in outputs.items():
        torch.testing.assert_close(y, outputs["eager"], msg=v, rtol=1e-4, atol=1e-5)


def test_run_times_latency_and_throughput_points():
    result = serve.run(("narrow",), ("eager", "fastmlp"), **QUICK)
    assert [(p.model, p.batch, p.kind) for p in result.points] == [
        ("narrow", 1, "latency"),
        ("narrow", 5, "throughput"),
    ]
    for p in result.points:
        assert p.calls >= 1 and not p.errors
        assert set(p.p50_us) == set(p.p99_us) == {"eager", "fastmlp"}
        assert all(0 < p.p50_us[v] <= p.p99_us[v] for v in p.p50_us)
        assert p.speedup("eager") == pytest.approx(p.p50_us["eager"] / p.p50_us["fastmlp"])
    assert result.points[1].samples_per_s("fastmlp") == pytest.approx(
        5 / (result.points[1].p50_us["fastmlp"] / 1e6)
    )
    assert serve.ServeResult.from_json(result.to_json()) == result
    table = serve.format_markdown(result)
    assert "| narrow | 1 | p50 / p99 us |" in table and "| narrow | 5 | samples/s |" in table
    assert "vs eager" in table and result.machine["threads"] >= 1


def test_percentile_is_the_nearest_rank():
    values = list(range(1, 101))
    assert serve._percentile(values, 50) == 50
    assert serve._percentile(values, 99) == 99
    assert serve._percentile([7.0], 99) == 7.0


def test_a_failing_optional_variant_is_recorded_and_the_rest_run(monkeypatch):
    real = serve.make_call

    def make_call(variant, model, x):
        if variant == "onnxruntime":
            raise RuntimeError("no exporter here\nsecond line")
        return real(variant, model, x)

    monkeypatch.setattr(serve, "make_call", make_call)
    result = serve.run(("narrow",), ("eager", "fastmlp", "onnxruntime"), **QUICK)
    for p in result.points:
        assert p.errors == {"onnxruntime": "RuntimeError: no exporter here"}
        assert set(p.p50_us) == {"eager", "fastmlp"}
    assert "failed" in serve.format_markdown(result)


def test_unknown_models_and_variants_are_refused():
    with pytest.raises(ValueError, match="unknown model 'wide'"):
        serve.run(("wide",), ("eager",), **QUICK)
    with pytest.raises(ValueError, match="unknown variant 'jit'"):
        serve.run(("narrow",), ("jit",), **QUICK)


def test_default_variants_follow_what_is_installed():
    assert serve.default_variants()[:2] == ("eager", "fastmlp")
    assert ("onnxruntime" in serve.default_variants()) == HAS_ORT
    assert serve.default_variants(compile=True)[-2:] == ("compile", "max-autotune")


@pytest.mark.slow
def test_cli_bench_serve_short_json(capsys):
    assert main(["bench", "--serve", "--short", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(p["model"], p["batch"]) for p in data["points"]] == [
        ("tutorial", 1),
        ("tutorial", 64),
        ("narrow", 1),
        ("narrow", 64),
    ]
    assert all("fastmlp" in p["p50_us"] for p in data["points"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--serve", "--grid"], "choose one of --grid and --serve"),
        (["--serve", "--precision", "bf16"], "--serve times fp32 only"),
        (["--serve", "--widths", "32"], "--widths needs --grid"),
    ],
)
def test_cli_bench_serve_refuses_what_it_cannot_do(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bench_serve_refuses_a_device_that_is_not_the_cpu(capsys):
    assert main(["bench", "--serve", "--device", "meta"]) == 1  # as every command's bad device
    assert "unsupported device 'meta'" in capsys.readouterr().err
