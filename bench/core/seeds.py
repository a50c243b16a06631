"""Per-sample seeds: sample ``i`` of a run depends only on ``(seed, i)``, never on the batch
or shard it is generated in (its noise, its class label)."""

from __future__ import annotations

import numpy as np


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` under base ``seed`` (independent of batching)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])
