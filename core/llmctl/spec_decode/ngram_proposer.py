"""Prompt lookup: if the last n tokens occurred earlier in the sequence, guess that what followed them then
follows them again. Cheap (no model), and strong wherever the output copies its input: edits, summaries with
quotes, code that repeats identifiers."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix of
        ``token_ids`` (``max_n`` tokens down to ``min_n``); empty when nothing matches."""
        n_tok = len(token_ids)
        if k <= 0 or n_tok <= self.min_n:
            return []
        arr = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, n_tok - 1), self.min_n - 1, -1):
            suffix = arr[n_tok - n:]
            windows = sliding_window_view(arr[:n_tok - 1], n)  # starts that leave at least one token after
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist()
        return []
