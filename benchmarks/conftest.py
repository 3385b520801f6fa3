"""Records the software versions in every benchmark JSON, next to the machine."""

from __future__ import annotations

import torch


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["torch_version"] = torch.__version__
    output_json["torch_threads"] = torch.get_num_threads()
