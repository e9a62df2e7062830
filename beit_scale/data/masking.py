"""Blockwise masking for BEiT masked image modeling (and the random-masking ablation).

Masks are unions of rectangles placed at random on the patch grid: each block covers at least
``min_num_patches`` patches (where room allows) and has an aspect ratio drawn log-uniformly from
[min_aspect, max_aspect]. Contiguous blocks make the task harder than scattered patches, which
could be filled in from their unmasked neighbours.

Unlike the official BEiT v1 generator, which stops after ten failed placements and can return
fewer masked patches than asked, this one always returns EXACTLY ``num_masking_patches``: once
block placement stalls, the remainder is added on the mask's border (cells touching the mask),
so the top-up does not create scattered single patches. Every random choice comes from the numpy
``Generator`` passed in, so a seeded generator gives the same mask on every machine and in every
worker.

``RandomMaskingGenerator`` is the paper's ablation: the same count of patches, chosen uniformly at
random, with the same calling convention (``masker(rng)``), so the dataset's per-sample
``(index, seed)`` keying (data/datasets.py ``seeded``) makes it reproducible and resumable exactly
like the blockwise one. ``build_masker(mode, ...)`` picks one by ``data.mask_mode``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["MaskingGenerator", "RandomMaskingGenerator", "build_masker", "MASK_MODES"]

MASK_MODES = ("block", "random")


class _CountMasker:
    """What both maskers share: grid and count checks, the generator's own rng (used when
    ``masker()`` gets no rng) and its resumable state. Subclasses implement ``sample(rng)``."""

    def __init__(self, input_size: Union[int, Sequence[int]], num_masking_patches: int,
                 seed: Optional[int]):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        total = self.height * self.width
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if not 0 <= num_masking_patches <= total:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} does not fit a {self.height}x{self.width} "
                f"grid ({total} patches); choose a count between 0 and {total}")
        self.num_masking_patches = int(num_masking_patches)
        self._rng = np.random.default_rng(seed)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    # -- resumable state of the generator's own rng -----------------------------------------------
    def state_dict(self) -> dict:
        return {"bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["bit_generator"]

    # -- generation --------------------------------------------------------------------------------
    def __call__(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        return self.sample(rng)[0]

    def sample(self, rng: Optional[np.random.Generator] = None):
        raise NotImplementedError


class RandomMaskingGenerator(_CountMasker):
    """Exactly ``num_masking_patches`` patches chosen uniformly at random (BEiT's ablation).

    One ``rng.permutation`` per call: the mask is a function of the rng's state alone, so a seeded
    rng gives the same mask everywhere and restoring the rng's state resumes the masks bit-exactly.
    """

    def __init__(self, input_size: Union[int, Sequence[int]] = (14, 14),
                 num_masking_patches: int = 75, seed: Optional[int] = None):
        super().__init__(input_size, num_masking_patches, seed)

    def __repr__(self):
        return f"RandomMaskingGenerator({self.height}x{self.width}, count={self.num_masking_patches})"

    def sample(self, rng: Optional[np.random.Generator] = None):
        """-> (mask bool[h, w], []): the blockwise sampler's return shape, with no blocks."""
        rng = self._rng if rng is None else rng
        mask = np.zeros(self.height * self.width, dtype=bool)
        mask[rng.permutation(mask.size)[:self.num_masking_patches]] = True
        return mask.reshape(self.height, self.width), []


class MaskingGenerator(_CountMasker):
    """Callable producing bool masks of shape ``input_size`` with exactly the requested count.

    Args:
        input_size: patch grid (h, w) or one int for a square grid.
        num_masking_patches: patches to mask per call (0..h*w).
        min_num_patches: smallest block area tried (reduced to what is left near the end).
        max_num_patches: largest block area (default: num_masking_patches).
        min_aspect, max_aspect: block aspect-ratio range (default max: 1 / min_aspect).
        seed: seeds the generator's own rng, used when ``__call__`` gets no rng.
        max_attempts: placements tried per block before falling back to the border top-up.
    """

    def __init__(self, input_size: Union[int, Sequence[int]] = (14, 14),
                 num_masking_patches: int = 75, min_num_patches: int = 16,
                 max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                 max_aspect: Optional[float] = None, seed: Optional[int] = None,
                 max_attempts: int = 10):
        super().__init__(input_size, num_masking_patches, seed)
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches if max_num_patches is not None else num_masking_patches)
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.max_attempts = int(max_attempts)

    def __repr__(self):
        return (f"MaskingGenerator({self.height}x{self.width}, count={self.num_masking_patches}, "
                f"block>={self.min_num_patches}, max_block={self.max_num_patches}, "
                f"aspect=[{self.min_aspect:.3g}, {self.max_aspect:.3g}])")

    def sample(self, rng: Optional[np.random.Generator] = None):
        """-> (mask bool[h, w], blocks [(top, left, h, w), ...] placed before the top-up)."""
        rng = self._rng if rng is None else rng
        H, W, target = self.height, self.width, self.num_masking_patches
        mask = np.zeros((H, W), dtype=bool)
        if target == 0:
            return mask, []
        if target == H * W:
            mask[:] = True
            return mask, [(0, 0, H, W)]

        lo, span = self.log_aspect[0], self.log_aspect[1] - self.log_aspect[0]
        count, blocks = 0, []
        sqrt, exp = math.sqrt, math.exp
        while count < target:
            remaining = target - count
            max_area = min(remaining, self.max_num_patches)
            # As in the official generator, the area is drawn between min_num_patches and what is
            # left even when less than min_num_patches is left: a big block then only fits by
            # overlapping the mask, which keeps the mask blocky instead of adding specks.
            min_area = self.min_num_patches
            # One vectorized draw per block: scalar rng calls dominate the cost otherwise.
            u = rng.random(4 * self.max_attempts).tolist()
            delta = 0
            for a in range(0, 4 * self.max_attempts, 4):
                area = min_area + u[a] * (max_area - min_area)
                aspect = exp(lo + u[a + 1] * span)
                h = int(round(sqrt(area * aspect)))
                w = int(round(sqrt(area / aspect)))
                if not (1 <= h <= H and 1 <= w <= W):
                    continue
                top = int(u[a + 2] * (H - h + 1))
                left = int(u[a + 3] * (W - w + 1))
                region = mask[top:top + h, left:left + w]
                delta = h * w - int(np.count_nonzero(region))
                if 0 < delta <= remaining:
                    region[...] = True
                    blocks.append((top, left, h, w))
                    break
                delta = 0
            if delta == 0:
                break
            count += delta

        if count < target:
            self._top_up(mask, target - count, rng)
        return mask, blocks

    @staticmethod
    def _top_up(mask: np.ndarray, need: int, rng: np.random.Generator) -> None:
        """Mask ``need`` more cells, chosen at random among those 4-adjacent to the mask."""
        if not mask.any():
            mask.flat[int(rng.integers(mask.size))] = True
            need -= 1
        while need > 0:
            border = np.zeros_like(mask)
            border[1:] |= mask[:-1]
            border[:-1] |= mask[1:]
            border[:, 1:] |= mask[:, :-1]
            border[:, :-1] |= mask[:, 1:]
            border &= ~mask
            cand = np.flatnonzero(border)
            if cand.size == 0:  # cannot happen on a non-full grid with a non-empty mask
                cand = np.flatnonzero(~mask)
            pick = cand if cand.size <= need else rng.choice(cand, size=need, replace=False)
            mask.flat[pick] = True
            need -= len(pick)


def build_masker(mode: str, input_size: Union[int, Sequence[int]], num_masking_patches: int,
                 min_num_patches: int = 16, seed: Optional[int] = None) -> _CountMasker:
    """The masker for ``data.mask_mode``: 'block' (BEiT's blockwise) or 'random' (same count)."""
    if mode == "block":
        return MaskingGenerator(input_size, num_masking_patches, min_num_patches=min_num_patches, seed=seed)
    if mode == "random":
        return RandomMaskingGenerator(input_size, num_masking_patches, seed=seed)
    raise ValueError(f"unknown mask mode {mode!r}; choose one of {MASK_MODES}")
