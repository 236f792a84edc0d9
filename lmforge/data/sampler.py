"""Which items go into which batch: a pure function of (seed, step), so resume and DDP need no sampler state."""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError


class StepSampler:
    """Global batch ``step`` = items ``perm_e[k*G : (k+1)*G]`` with G = batch_size * world_size, e the epoch,
    k the step within it, and ``perm_e`` a permutation of all items seeded by (seed, e); rank r takes
    ``[r*batch_size : (r+1)*batch_size]`` of that global batch, so ranks are disjoint.

    Resuming is just asking for the next step number. One process with accumulation A over micro-steps
    ``step*A + i`` sees exactly the items that A processes see at ``step`` (for the same G), which is what
    makes DDP runs comparable to single-process runs.

    ``drop_last``: the last incomplete global batch of an epoch is dropped; otherwise it is completed with
    items from the start of the same permutation, so every batch keeps its size and every item is seen.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        if num_items < 0 or batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"bad sampler geometry: num_items={num_items}, batch_size={batch_size}, "
                              f"rank={rank}, world_size={world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        if drop_last or num_items == 0:
            self.steps_per_epoch = num_items // self.global_batch
        else:
            self.steps_per_epoch = -(-num_items // self.global_batch)
        self._perm: tuple[int, torch.Tensor] | None = None  # the current epoch's permutation, cached

    def _check(self, step: int) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{self.num_items} items cannot fill one global batch of {self.global_batch}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")

    def epoch_of(self, step: int) -> int:
        self._check(step)
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        """This rank's item indices for global batch ``step``."""
        self._check(step)
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.rank * self.batch_size
        positions = torch.arange(start, start + self.batch_size) % self.num_items  # wraps only if not drop_last
        return self._permutation(epoch)[positions].tolist()
