"""What aborting branches saved: pure functions behind `Usage.saved_tokens` and `Usage.unspent_token_cap`.

Nobody knows how long an aborted branch would have run, so a saving read off one run is an estimate.
The measured saving is the difference to a baseline run on the same problems (`ttscale report`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unspent_token_cap(aborted: Sequence[tuple[int, int]]) -> int:
    """Sum over aborted branches of `max_tokens - generated`: a ceiling on what aborting saved, not a saving.

    `aborted` holds (generated tokens, max_tokens) per aborted branch.
    """
    return int(sum(max(0, cap - generated) for generated, cap in aborted))


def estimated_saved_tokens(aborted_generated: Sequence[int], finished_lengths: Sequence[int]) -> int:
    """Estimate of the tokens the aborted branches would still have generated.

    Each aborted branch is assumed to have run as long as the median finished branch of the same run
    (for FFS: the winner's length), so it contributes `max(0, median - generated)`; with no finished
    branch there is nothing to go by and the estimate is 0.
    """
    if not finished_lengths or not aborted_generated:
        return 0
    typical = float(np.median(finished_lengths))
    return int(sum(max(0.0, typical - g) for g in aborted_generated))
