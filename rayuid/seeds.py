"""Every seed a run derives, in one place: each draw is a pure function of (``cfg.seed``, what is drawn), so a
resumed or retried step draws exactly what an uninterrupted one would."""

EPOCH_STRIDE = 1000
"""``seed * 1000 + epoch``: the permutation of one epoch (offline examples, online prompts)."""
STEP_STRIDE = 1000
"""``seed + step * 1000 + shard``: the sampling seed of one engine's share of a step's replies."""
USER_STRIDE = 7919
"""``seed + 7919 * k``: the prompt draw of the k-th configured user (a prime, so users' draws do not line up)."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * EPOCH_STRIDE + epoch


def sampling_seed(seed: int, step: int, shard: int) -> int:
    return seed + step * STEP_STRIDE + shard


def user_seed(seed: int, k: int) -> int:
    return seed + USER_STRIDE * k
