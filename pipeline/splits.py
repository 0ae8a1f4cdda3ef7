"""The one rule for holding backgrounds out: the trainer's validation split and the exports'
`--holdout-backgrounds` both call it, so a model trained on an export is scored on the same
unseen backgrounds as the bundled trainer's validation."""

from __future__ import annotations

import numpy as np

from .errors import DatasetError


def split_backgrounds(num_bg: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, validation ids), sorted. holdout < 1 is a fraction, >= 1 a count; at least
    one background stays on each side when there are two or more."""
    if num_bg < 2:
        raise DatasetError(
            f"validation is held out by background, and the dataset has {num_bg}; "
            "make it from two or more backgrounds"
        )
    k = round(num_bg * holdout) if holdout < 1 else int(holdout)
    k = min(max(k, 1), num_bg - 1)
    perm = np.random.default_rng([seed, 0x5A17]).permutation(num_bg)
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])
