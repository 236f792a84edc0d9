"""Which items go into which batch: a pure function of (seed, step), so resume and DDP need no sampler state."""

from __future__ import annotations

import torch


class StepSampler:
    """Global batch ``step`` = items ``perm_e[k*G : (k+1)*G]`` with G = batch_size * world_size, e the epoch
    and ``perm_e`` a permutation seeded by (seed, e); rank r takes its slice of that global batch.

    One process with accumulation A over micro-steps ``step*A + i`` sees exactly the items that A
    processes see at ``step`` (for the same G), which is what makes DDP runs comparable to single runs.
    The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_items} items cannot fill one global batch of {self.global_batch}")
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size].tolist()
