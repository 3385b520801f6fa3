"""The fast path: a whole split resident on the device, batched without per-sample Python.

Replaces ``torch.utils.data.DataLoader`` for in-memory datasets such as Fashion-MNIST: one
``randperm`` per epoch, one gather per batch, optional augmentation done on the device for
the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["DeviceLoader"]


class DeviceLoader:
    """Batches from a whole split resident on ``device``: the fast replacement for DataLoader.

    The images are converted to ``float32`` in ``[0, 1]`` once (``ToTensor`` semantics, so
    models move freely between this loader and the tutorial's pipeline). Each epoch draws a
    ``randperm`` from a generator seeded with ``(seed, epoch)``: the order depends only on
    those two numbers, which makes resuming exact without saving generator state.

    Yields ``(X float32 (B, 1, 28, 28), y int64 (B,))`` on ``device``. ``augment`` adds a
    random horizontal flip and a random shift of up to ``max_shift`` pixels per image (zero
    padding), done on the device for the whole batch at once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: bool = False,
        max_shift: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.x = images.to(self.device).float().div_(255.0)
        self.y = labels.to(self.device, torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augment = augment
        self.max_shift = max_shift
        self.epoch = 0

    @property
    def dataset(self) -> torch.utils.data.TensorDataset:
        """The resident split, so ``len(loader.dataset)`` works as with a DataLoader."""
        return torch.utils.data.TensorDataset(self.x, self.y)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle/augmentation stream for ``epoch`` (also advanced by iterating)."""
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        # Distinct streams per (seed, epoch); the large odd multiplier avoids overlaps
        # such as (seed=1, epoch=0) == (seed=0, epoch=1).
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return g

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self._generator()
        n = len(self.y)
        order = torch.randperm(n, generator=g, device=self.device) if self.shuffle else None
        self.epoch += 1
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, n), self.batch_size):
            end = start + self.batch_size
            if order is None:
                x, y = self.x[start:end], self.y[start:end]
            else:
                x, y = self.x[order[start:end]], self.y[order[start:end]]
            if self.augment:
                x = _augment(x, g, self.max_shift)
            yield x.unsqueeze(1), y


def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random horizontal flip and integer shift of a batch ``(B, H, W)``, all on device."""
    b, h, w = x.shape
    flip = torch.rand(b, generator=g, device=x.device) < 0.5
    x = torch.where(flip[:, None, None], x.flip(-1), x)
    if max_shift <= 0:
        return x
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s))
    # One gather for the whole batch: row/column offsets per image index the padded batch.
    dy = torch.randint(0, 2 * s + 1, (b, 1), generator=g, device=x.device)
    dx = torch.randint(0, 2 * s + 1, (b, 1), generator=g, device=x.device)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.arange(w, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]
