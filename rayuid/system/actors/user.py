"""The simulated user as a Ray actor body: it turns (prompt, reply) batches into follow-ups for the teacher.

A thin shell over `rayuid.feedback.users` so the persona logic stays plain Python and testable without Ray; for an LLM user
the engine is built inside the actor (by `engine_factory`), where its GPU/CPU resources live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rayuid.feedback.users import LLMUserSimulator, make_simulator


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
        self._generate_fn, self._params = generate_fn, dict(params or {})
        self._others: dict[tuple, object] = {}
        self.calls = self.replies = 0

    def respond(self, prompts: Sequence[str], replies: Sequence[str]) -> list[str]:
        """One follow-up per (prompt, reply), in order."""
        return self._tally(self.simulator.respond(list(prompts), list(replies)))

    def respond_as(self, persona: str, persona_params: dict, prompts: Sequence[str],
                   replies: Sequence[str]) -> list[str]:
        """As ``respond``, played by another persona (per-user runs: each user id has its own, which may change)."""
        key = (persona, tuple(sorted(persona_params.items())))
        if key not in self._others:
            shared = {k: v for k, v in self._params.items() if k in ("max_tokens", "temperature")}
            self._others[key] = make_simulator(self.kind, persona, self._generate_fn, **shared, **persona_params)
        return self._tally(self._others[key].respond(list(prompts), list(replies)))

    def _tally(self, followups: list[str]) -> list[str]:
        self.calls += 1
        self.replies += len(followups)
        return followups

    def stats(self) -> dict[str, Any]:
        """Counters since start; fallbacks = LLM outputs that were empty after cleaning (always 0 for rules)."""
        fallbacks = self.simulator.fallbacks if isinstance(self.simulator, LLMUserSimulator) else 0
        return {"kind": self.kind, "persona": self.persona, "calls": self.calls, "replies": self.replies,
                "fallbacks": fallbacks}
