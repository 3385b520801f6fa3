"""Shared pytest setup: CPU path measurement off, the CUDA marker's skip, and per-test
outcomes for the GPU check."""

from __future__ import annotations

import json
import os

import pytest
import torch

# The suite checks the CPU paths' rule and exact results: paths measured at a shape's first
# call (fastmlp.engines.set_cpu_tuning) would depend on this machine's timings. Off for
# every test and the processes they start; tests of the measurement turn it on.
os.environ.setdefault("FASTMLP_CPU_TUNE", "off")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --- per-test outcomes for scripts/gpu_engine_table.py --------------------------
# With FASTMLP_TEST_RESULTS=path, every test's outcome is appended to path as one
# JSON line with its engine/precision parameters: gpu_check.sh derives from them
# which engines a GPU run has validated (all of an engine's tests passed).


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    path = os.environ.get("FASTMLP_TEST_RESULTS")
    report = outcome.get_result()
    if not path or (report.when != "call" and not report.failed):
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    record = {
        "test": item.nodeid,
        "outcome": report.outcome,
        **{k: str(params[k]) for k in ("engine", "prec", "dtype") if k in params},
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
