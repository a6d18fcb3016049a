"""The simulated user as a Ray actor body: it turns (prompt, reply) batches into follow-ups for the teacher.

A thin shell over `rayuid.users` so the persona logic stays plain Python and testable without Ray; for an LLM user
the engine is built inside the actor (by `engine_factory`), where its GPU/CPU resources live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rayuid.users import LLMUserSimulator, make_simulator


class UserSimulatorWorker:
    """Holds one simulator; `stats()` exposes call and fallback counts for the run's metrics."""

    def __init__(self, kind: str, persona: str, params: dict[str, Any] | None = None,
                 engine_factory: Callable[[], Any] | None = None) -> None:
        """`params`: persona parameters (e.g. max_words) plus max_tokens/temperature for an LLM user.
        `engine_factory()` (kind "llm" only) returns an object with `.chat(message_lists, max_tokens, temperature)`."""
        generate_fn = None
        if kind == "llm":
            if engine_factory is None:
                raise ValueError('kind="llm" needs an engine_factory that builds the user model\'s chat engine')
            generate_fn = engine_factory().chat
        self.kind, self.persona = kind, persona
        self.simulator = make_simulator(kind, persona, generate_fn, **dict(params or {}))
        self.calls = self.replies = 0

    def respond(self, prompts: Sequence[str], replies: Sequence[str]) -> list[str]:
        """One follow-up per (prompt, reply), in order."""
        followups = self.simulator.respond(list(prompts), list(replies))
        self.calls += 1
        self.replies += len(followups)
        return followups

    def stats(self) -> dict[str, Any]:
        """Counters since start; fallbacks = LLM outputs that were empty after cleaning (always 0 for rules)."""
        fallbacks = self.simulator.fallbacks if isinstance(self.simulator, LLMUserSimulator) else 0
        return {"kind": self.kind, "persona": self.persona, "calls": self.calls, "replies": self.replies,
                "fallbacks": fallbacks}
