"""The visit-width analysis (``attndsl.passes.visit_width``): positions the closed-form visit ranges
name per tile and on average, and whether the forward's work grows along the query tiles."""
import torch

import attndsl
from attndsl.passes.visit_width import heavy_first, mean_visited, range_widths
from attndsl.patterns import causal, document, prefix_lm, sliding_window


def spec(**kw):
    return attndsl.compile(**kw).spec


def test_mean_visited():
    """Per key tile, a window's width plus the tile (less at the end), every query without a mask,
    half on average under a causal mask; per query tile, the window's keys. None for a
    data-dependent mask, whose closed-form range only bounds its work (a document mask's is causal)."""
    win = spec(mask_mod=sliding_window(1024))
    assert 1100 < mean_visited(win, win.bwd_range, 16384, 16384, 128) < 1151  # the last programs see fewer queries
    assert 1100 < mean_visited(win, win.fwd_range, 16384, 16384, 128) < 1151  # the first see fewer keys
    dense = spec()
    assert mean_visited(dense, dense.bwd_range, 3000, 1000, 128) == 1000
    assert mean_visited(dense, dense.fwd_range, 1000, 3000, 128) == 3000
    c = spec(mask_mod=causal)
    assert abs(mean_visited(c, c.bwd_range, 4096, 4096, 128) - (4096 + 128) / 2) <= 1
    docs = spec(mask_mod=document(torch.zeros(256, dtype=torch.int64)))
    assert mean_visited(docs, docs.bwd_range, 256, 256, 128) is None


def test_range_widths_per_tile():
    """Causal: query tile t of 128 rows sees keys 0..128t+127 (clamped to the keys there are); a
    window of 256 at most 256 + 127 keys per tile; more queries than keys clamp at the keys."""
    c = spec(mask_mod=causal)
    starts = torch.arange(0, 512, 128)
    assert range_widths(c.fwd_range, starts, 128, 512, 512).tolist() == [128, 256, 384, 512]
    assert range_widths(c.fwd_range, starts, 128, 512, 300).tolist() == [128, 256, 300, 300]
    win = spec(mask_mod=sliding_window(256))
    got = range_widths(win.fwd_range, starts, 128, 512, 512).tolist()
    assert got[0] == 128 and all(w <= 256 + 127 for w in got) and got[-1] > 256


def test_range_widths_refuse_ranges_that_read_tensors():
    """A range that reads a captured tensor (per batch or head) names no width."""
    lens = torch.tensor([100, 200])

    def per_batch_length(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]
    s = spec(mask_mod=per_batch_length)
    assert not s.data_dependent  # bounded per batch in closed form, by a loaded length
    assert range_widths(s.fwd_range, torch.arange(0, 256, 128), 128, 256, 256) is None
    assert mean_visited(s, s.fwd_range, 256, 256, 128) is None


def test_heavy_first():
    """Growing work along the query tiles (causal, prefix-LM) against dense and a sliding window
    (only its first tiles are lighter)."""
    want = {None: False, causal: True, sliding_window(256): False, prefix_lm(100): True}
    for mask, heavy in want.items():
        assert heavy_first(spec(mask_mod=mask)) is heavy, mask
