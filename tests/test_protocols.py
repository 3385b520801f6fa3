"""fastmlp.protocols: the interfaces train_loop looks for are the ones fastmlp's own
optimizer and loader offer, and plain PyTorch's do not (so the loop falls back)."""

from __future__ import annotations

import torch

from fastmlp.nn import MLP
from fastmlp.optim import FusedSGD
from fastmlp.protocols import GlobalBatchSized, TrainStepProvider, WeightedBatchSource
from fastmlp.workflow.loader import DeviceLoader


def test_fused_sgd_offers_its_train_step_and_sgd_does_not():
    model = MLP()
    assert isinstance(FusedSGD(model, lr=0.1), TrainStepProvider)
    assert not isinstance(torch.optim.SGD(model.parameters(), lr=0.1), TrainStepProvider)


def test_device_loader_offers_weighted_batches_and_its_global_batch():
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    loader = DeviceLoader(images, labels, batch_size=4, rank=1, world_size=2)
    assert isinstance(loader, WeightedBatchSource)
    assert isinstance(loader, GlobalBatchSized) and loader.global_batch_size == 8
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels))
    assert not isinstance(plain, WeightedBatchSource)
    assert not isinstance(plain, GlobalBatchSized)
