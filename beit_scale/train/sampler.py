"""A resumable, elastic data order.

Each epoch is one global permutation of the dataset (from seed and epoch).  Rank r of W reads
positions offset + r, offset + r + W, ... of it, where `offset` counts the samples the whole job
has consumed in this epoch.  Because the position is global, a run saved on W ranks resumes on
W' ranks at the same place in the same permutation.

Keys are `(index, sample_seed)`: the sample datasets seed every random choice of a sample from
its key, so augmentations and masks do not depend on worker count or scheduling.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class ResumableSampler(Sampler):
    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        self.epoch = 0
        self.offset = 0  # global samples already consumed in this epoch

    def set_position(self, epoch: int, offset: int) -> None:
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        return max(0, (self.n - self.offset) // self.world)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)[self.offset:]
        usable = len(order) // self.world * self.world
        for i in order[self.rank:usable:self.world]:
            yield (int(i), sample_seed(self.seed, self.epoch, int(i)))


def eval_keys(n: int, rank: int, world_size: int, limit: int | None, seed: int) -> tuple[list, int]:
    """Keys of rank `rank` for a deterministic evaluation pass over the first `limit` samples.

    Every sample is evaluated exactly once across ranks; ranks are padded to equal length (so
    collectives line up) and the padding is reported as the count of valid keys.
    """
    total = n if limit is None else min(n, limit)
    mine = list(range(rank, total, world_size))
    per_rank = -(-total // world_size)
    valid = len(mine)
    while len(mine) < per_rank:
        mine.append(mine[-1] if mine else 0)
    return [(i, sample_seed(seed, -1 & 0x7FFFFFFF, i)) for i in mine], valid
