"""Which weights the hindsight teacher uses: the live policy, an EMA of it, or the frozen initial model.

The paper's teacher is the live policy itself (no copy). The EMA and frozen variants keep a shadow copy of only
the *trainable* tensors (the whole model for full fine-tuning, the adapter for LoRA) and swap it in for the
teacher's no-grad forward, so no second model object is ever built.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from rayuid.sdpo.losses import ema_update_


class TeacherWeights:
    """``mode``: 'live' | 'ema' | 'frozen'. Frozen is an EMA with rate 0: the shadow stays the initial weights."""

    def __init__(self, model: torch.nn.Module, mode: str = "live", ema_rate: float = 0.05):
        if mode not in ("live", "ema", "frozen"):
            raise ValueError(f"teacher weights must be live, ema or frozen, got {mode!r}")
        self.mode = mode
        self.rate = ema_rate if mode == "ema" else 0.0
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        if mode != "live":
            self.shadow = {n: p.detach().clone() for n, p in self._params.items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the model computes with the teacher's weights (swap by ``.data``, no copies, no grad)."""
        if not self.shadow:
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        with torch.no_grad():
            for name, param in self._params.items():
                current = param.data
                param.data = self.shadow[name]
                self.shadow[name] = current

    def after_step(self) -> None:
        """θ_T ← (1−τ)θ_T + τθ after each optimizer step (no-op for live and frozen)."""
        if self.mode == "ema":
            names = list(self._params)
            ema_update_([self.shadow[n] for n in names], [self._params[n].detach() for n in names], self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "live":
            return
        missing = set(self._params) - set(state)
        if missing:
            raise ValueError(f"teacher state lacks {len(missing)} tensors (e.g. {sorted(missing)[:3]}); "
                             "was the checkpoint written with another teacher.weights or LoRA setting?")
        self.shadow = {n: state[n].clone() for n in self._params}
