"""Precision that fits the hardware (fastmlp.hardware), with the CPU's abilities monkeypatched."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastmlp import hardware


@pytest.fixture
def cpu(monkeypatch):
    """Sets what the CPU probes report: cpu(avx512_bf16=..., amx=...)."""

    def set_cpu(avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    hardware._warn_slow_bf16.cache_clear()
    yield set_cpu
    hardware._warn_slow_bf16.cache_clear()


@pytest.mark.parametrize(
    "avx512_bf16,amx,expected",
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")],
)
def test_auto_on_cpu_follows_native_bf16(cpu, avx512_bf16, amx, expected):
    cpu(avx512_bf16=avx512_bf16, amx=amx)
    assert hardware.resolve_precision("auto", "cpu") == expected


def test_missing_private_probes_mean_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not hardware.cpu_has_native_bf16()
    assert hardware.resolve_precision("auto", "cpu") == "fp32"


def test_failing_private_probe_means_not_native(monkeypatch):
    def broken():
        raise RuntimeError("probe failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not hardware.cpu_has_native_bf16()


def test_explicit_bf16_without_native_support_warns_once(cpu):
    cpu(avx512_bf16=False, amx=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert hardware.resolve_precision("bf16", "cpu") == "bf16"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "several times slower" in messages[0] and "auto" in messages[0]


@pytest.mark.parametrize("requested", ["bf16", "fp32", "auto"])
def test_no_warning_where_bf16_is_native_or_not_asked(cpu, requested):
    cpu(avx512_bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hardware.resolve_precision(requested, "cpu")
    cpu(avx512_bf16=False)
    if requested != "bf16":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hardware.resolve_precision(requested, "cpu")


@pytest.mark.parametrize(
    "capability,expected", [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_auto_on_cuda_follows_the_gpu(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert hardware.resolve_precision("auto", "cuda") == expected


def test_fp32_is_kept_everywhere(cpu):
    cpu(avx512_bf16=True, amx=True)
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        hardware.resolve_precision("fp8", "cpu")


def test_cpu_info_reads_model_and_isa_flags():
    info = hardware.cpu_info()
    assert info.model and isinstance(info.model, str)
    assert set(info.flags) <= set(hardware.ISA_FLAGS)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    assert ("avx2" in info.flags) == ("avx2" in flags)
    assert ("avx512_bf16" in info.flags) == ("avx512_bf16" in flags)


def test_describe_is_json_and_names_the_cpu(cpu):
    cpu(avx512_bf16=True)
    facts = hardware.describe("cpu")
    assert json.loads(json.dumps(facts)) == facts
    assert facts["cpu"] == hardware.cpu_info().model
    assert facts["cpu_native_bf16"] is True
    assert facts["threads"] == torch.get_num_threads()
    assert "gpu" not in facts
