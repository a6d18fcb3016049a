"""The pairwise LLM judge as a Ray actor: its own vLLM engine, and ``rayuid.feedback.judges`` for prompts and verdicts.

Every pair is judged twice with the positions swapped (one batched chat call); disagreeing verdicts are a tie.
Used by the held-out evaluation of per-user runs (``online.judge``), e.g. Qwen3-8B judging a Qwen3-4B policy.
A judgement whose prompt does not fit the judge's context is not sent: it counts as a tie and in ``stats()``.
"""

from __future__ import annotations

from rayuid.feedback import judges
from rayuid.system.actors.inference import start_engine


class JudgeWorker:
    def __init__(self, model: str, settings: dict, max_tokens: int, seed: int = 0, threads: int | None = None):
        self.engine = start_engine(model, settings, False, seed, threads)
        self.max_tokens = max_tokens
        self.limit = settings["max_model_len"] - max_tokens
        self.judged = self.too_long = 0

    def judge(self, persona_description: str, prompts: list[str], xs: list[str], ys: list[str]) -> list[str]:
        """"x", "y" or "tie" per prompt: which reply fits the persona better (style, tone, format, verbosity)."""
        return judges.judge_pairs(self._chat, persona_description, prompts, xs, ys)

    def _chat(self, conversations: list[list[dict]]) -> list[str]:
        fits = [self._length(c) <= self.limit for c in conversations]
        sent = [c for c, ok in zip(conversations, fits) if ok]
        outs = iter(self.engine.chat(sent, self.max_tokens, 0.0) if sent else [])
        self.judged += len(fits)
        self.too_long += fits.count(False)
        return [next(outs) if ok else "" for ok in fits]

    def _length(self, conversation: list[dict]) -> int:
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        return len(tok(text, add_special_tokens=False).input_ids)

    def stats(self) -> dict:
        """Judgements asked for, and how many did not fit the context (each counted as a tie)."""
        return {"judged": self.judged, "too_long": self.too_long}

    def version(self) -> int:
        return 0
