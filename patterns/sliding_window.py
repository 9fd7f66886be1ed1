"""Sliding-window (local) attention.

Each query sees only keys within a fixed distance of itself, as in Longformer's local
attention (Beltagy et al., 2020, arXiv:2004.05150) and Mistral 7B's sliding-window
attention (Jiang et al., 2023, arXiv:2310.06825).

* ``causal=True``: query ``i`` sees the ``window`` most recent keys including itself,
  ``0 <= i - j < window`` (Mistral's convention).
* ``causal=False``: query ``i`` sees ``|i - j| <= window``, i.e. ``2 * window + 1`` keys.

Note that the two variants count ``window`` differently (keys seen vs. reach on each side).
"""


def sliding_window(window: int, causal: bool = True):
    """Sliding-window mask of width ``window``; see the module docstring."""
    if window < 1 and causal:
        raise ValueError(f"causal sliding window needs window >= 1, got {window}")
    if window < 0:
        raise ValueError(f"sliding window needs window >= 0, got {window}")

    if causal:
        def sliding_window_causal(b, h, q_idx, kv_idx):
            diff = q_idx - kv_idx
            return (diff >= 0) & (diff < window)

        return sliding_window_causal

    def sliding_window_bidirectional(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    return sliding_window_bidirectional
