"""Records the machine (CPU model, ISA flags, GPU) and the software versions in every
benchmark JSON."""

from __future__ import annotations

import torch

from fastmlp import hardware


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["torch_version"] = torch.__version__
    output_json["torch_threads"] = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    output_json["machine"] = hardware.describe(device)
