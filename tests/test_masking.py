"""Blockwise MIM masking: exact counts, reproducibility, blockiness, aspect ratios, errors."""
import numpy as np
import pytest

from beit_scale.data.masking import MaskingGenerator


def components(mask: np.ndarray) -> int:
    """Number of 4-connected components of True cells (plain flood fill, independent of the code)."""
    seen = np.zeros_like(mask)
    H, W = mask.shape
    n = 0
    for i in range(H):
        for j in range(W):
            if mask[i, j] and not seen[i, j]:
                n += 1
                stack = [(i, j)]
                seen[i, j] = True
                while stack:
                    y, x = stack.pop()
                    for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                        if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
    return n


@pytest.mark.parametrize("count", [0, 1, 5, 15, 16, 40, 75, 98, 150, 195, 196])
def test_exact_count_over_many_seeds(count):
    gen = MaskingGenerator((14, 14), num_masking_patches=count)
    for seed in range(200):
        m = gen(np.random.default_rng(seed))
        assert m.shape == (14, 14) and m.dtype == bool
        assert int(m.sum()) == count, (count, seed)


@pytest.mark.parametrize("size,count,min_patches", [((7, 9), 20, 4), ((16, 16), 100, 16), ((14, 14), 75, 30)])
def test_exact_count_other_grids(size, count, min_patches):
    gen = MaskingGenerator(size, num_masking_patches=count, min_num_patches=min_patches)
    for seed in range(100):
        m = gen(np.random.default_rng(seed))
        assert m.shape == size and int(m.sum()) == count


def test_reproducible_with_seeded_rng():
    gen = MaskingGenerator()
    for seed in range(20):
        a = gen(np.random.default_rng(seed))
        b = MaskingGenerator()(np.random.default_rng(seed))
        assert np.array_equal(a, b)
    # and different seeds give different masks (not one constant mask)
    masks = {gen(np.random.default_rng(s)).tobytes() for s in range(50)}
    assert len(masks) > 45


def test_own_generator_seed_and_state_dict():
    g1, g2 = MaskingGenerator(seed=7), MaskingGenerator(seed=7)
    seq1 = [g1() for _ in range(5)]
    seq2 = [g2() for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(seq1, seq2))
    state = g1.state_dict()
    after = [g1() for _ in range(3)]
    g3 = MaskingGenerator(seed=123)
    g3.load_state_dict(state)
    assert all(np.array_equal(a, g3()) for a in after)


def test_masks_are_blocky():
    gen = MaskingGenerator(num_masking_patches=75)
    rng = np.random.default_rng(0)
    block = np.mean([components(gen(rng)) for _ in range(200)])
    scatter = []
    for _ in range(200):
        m = np.zeros(196, dtype=bool)
        m[rng.choice(196, 75, replace=False)] = True
        scatter.append(components(m.reshape(14, 14)))
    scatter = np.mean(scatter)
    # measured: ~2 components for blocks vs ~20 for scatter
    assert block < 0.25 * scatter, (block, scatter)
    assert block < 5


def test_block_shapes_respect_area_and_aspect():
    gen = MaskingGenerator(num_masking_patches=75, min_num_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(300):
        _, blocks = gen.sample(rng)
        assert blocks, "a 75-patch mask on 14x14 always places at least one block"
        for top, left, h, w in blocks:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            # h and w are rounded from sqrt(area*r) and sqrt(area/r): the drawn r lies in
            # [(h-.5)/(w+.5), (h+.5)/(w-.5)], which must meet [min_aspect, max_aspect].
            assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 + 1e-9
            assert (h + 0.5) / (w - 0.5) >= 0.3 - 1e-9
            ratios.append(h / w)
        # The first block is drawn with area in [16, 75] (later ones may be smaller when less
        # than 16 patches are left); rounding loses at most half a cell per side.
        top, left, h, w = blocks[0]
        assert (h + 0.5) * (w + 0.5) >= 16
    ratios = np.array(ratios)
    # log-uniform aspect is symmetric around 1: both orientations are common
    assert 0.3 < np.mean(ratios > 1) < 0.7 or 0.3 < np.mean(ratios < 1) < 0.7
    assert ratios.max() > 2 and ratios.min() < 0.5


def test_errors():
    with pytest.raises(ValueError, match="197.*14x14|does not fit"):
        MaskingGenerator((14, 14), num_masking_patches=197)
    with pytest.raises(ValueError):
        MaskingGenerator((14, 14), num_masking_patches=-1)
    with pytest.raises(ValueError):
        MaskingGenerator((14, 14), min_aspect=0.0)


# ----------------------------------------------------------------------------- fixed-size gather


def test_fixed_size_gather_lists_the_boolean_index_targets_in_order():
    """MIM targets from `masked_positions` + gather (size known, no host sync) are exactly
    `ids[mask]`: the same positions in the same row-major order, for real blockwise masks."""
    import torch

    from beit_scale.train.tasks.base import masked_positions, uniform_mask_count
    for grid, count in (((14, 14), 75), ((16, 16), 98), ((8, 8), 25), ((14, 14), 0), ((14, 14), 196)):
        gen = MaskingGenerator(grid, num_masking_patches=count, min_num_patches=min(16, max(count, 1)))
        rng = np.random.default_rng(count)
        mask = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(16)]))
        assert uniform_mask_count(mask) == count
        pos = masked_positions(mask, count)
        assert pos.shape == (16, count)
        assert torch.equal(pos.reshape(-1), mask.nonzero()[:, 1])  # row-major, ascending per row
        ids = torch.randint(0, 8192, mask.shape)
        assert torch.equal(ids.gather(1, pos).reshape(-1), ids[mask])
        feats = torch.randn(*mask.shape, 5)  # what the model's head sees: rows of [B, N, D]
        got = feats.gather(1, pos[..., None].expand(-1, -1, 5)).reshape(-1, 5)
        assert torch.equal(got, feats[mask])
    uneven = torch.zeros(2, 9, dtype=torch.bool)
    uneven[0, :3] = True
    uneven[1, :2] = True
    assert uniform_mask_count(uneven) is None  # the task falls back to boolean indexing
