"""Which persona a user plays at a step: the schedule advances every ``online.switch_every`` steps."""

from __future__ import annotations

from rayuid.config import UserSpec


def phase_at(user: UserSpec, step: int, switch_every: int | None) -> int:
    """Index into ``user.personas`` at ``step`` (0-based): the schedule advances every ``switch_every`` steps."""
    return 0 if len(user.personas) == 1 else min(step // switch_every, len(user.personas) - 1)


def persona_at(user: UserSpec, step: int, switch_every: int | None) -> str:
    return user.personas[phase_at(user, step, switch_every)]
