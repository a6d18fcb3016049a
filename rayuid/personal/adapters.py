"""Per-user personalization: one shared base model, one PEFT LoRA adapter per user id, trained by SDPO only on that
user's interactions.

Plain torch + PEFT (no Ray): the adapter learner actor forwards to ``UserAdapters``. Each user's adapter is a named
PEFT adapter with its own AdamW, schedule and (for EMA/frozen teachers) its own teacher shadow; while user A trains,
only A's LoRA tensors require grad, so another user's adapter cannot change (tested bit for bit). The hindsight
teacher is the same adapter with the user's follow-up in context (``rayuid.sdpo.step.micro_step``).

On disk (``AdapterStore``): ``RUN_DIR/adapters/<user>/v000003/`` = ``adapter_config.json`` +
``adapter_model.safetensors`` (what ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load) +
``adapter_state.pt`` (optimizer, schedule, teacher shadow: what a resumed run needs).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from rayuid.config import USER_ID_PATTERN, TrainConfig
from rayuid.data.templates import ScoringPair
from rayuid.records import storage
from rayuid.sdpo.models import load_causal_lm, load_tokenizer, resolve_model
from rayuid.sdpo.optim import build_optimizer, optimizer_step
from rayuid.sdpo.scoring import response_logprobs
from rayuid.sdpo.step import autocast, student_batch, train_batch
from rayuid.sdpo.teacher_weights import TeacherWeights
from rayuid.sdpo.weights import WeightsBlob, jsonable, pack_state_dict, write_adapter

USER_ID = re.compile(USER_ID_PATTERN)
STATE_FILE = "adapter_state.pt"
_VERSION_DIR = re.compile(r"^v(\d+)$")


def check_user_id(user: str) -> str:
    """User ids name PEFT adapters, folders and vLLM LoRA names, so they are restricted to a safe alphabet."""
    if not isinstance(user, str) or not USER_ID.match(user):
        raise ValueError(f"user id {user!r} is not usable: use 1-64 letters, digits, '_' or '-' "
                         "(map other ids, e.g. emails, to such keys before training)")
    return user


class AdapterStore:
    """``root/<user>/v<version>/`` folders (``root``: a local path or a URI, ``rayuid.records.storage``); a version
    is complete once its ``adapter_state.pt`` exists (written last)."""

    def __init__(self, root: str | Path):
        self.root = storage.join(root)

    def path(self, user: str, version: int) -> str:
        return storage.join(self.root, check_user_id(user), f"v{version:06d}")

    def versions(self, user: str) -> list[int]:
        folder = storage.join(self.root, check_user_id(user))
        found = [int(m.group(1)) for name in storage.listdir(folder) if (m := _VERSION_DIR.match(name))]
        return sorted(v for v in found if storage.exists(storage.join(self.path(user, v), STATE_FILE)))

    def users(self) -> list[str]:
        return [name for name in storage.listdir(self.root) if USER_ID.match(name) and self.versions(name)]

    def latest(self, user: str) -> str | None:
        found = self.versions(user)
        return self.path(user, found[-1]) if found else None

    def prune(self, user: str, keep_last: int, keep: set[int] = frozenset()) -> None:
        """Drop all but the newest ``keep_last`` versions of ``user`` (and those in ``keep``)."""
        for version in self.versions(user)[:-keep_last]:
            if version not in keep:
                storage.delete(self.path(user, version))


class UserAdapters:
    """All users' adapters on one base model. ``train_step(user, pairs)`` touches only ``user``'s adapter."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        if cfg.model.lora is None:
            raise ValueError("per-user personalization trains one LoRA adapter per user: set model.lora "
                             "(e.g. model.lora.r=16) in the job config")
        self.cfg, self.total_steps = cfg, total_steps
        path = resolve_model(cfg.model.name)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.base = load_causal_lm(path, cfg.model.dtype).to(self.device)
        self.model = None  # the PeftModel, built with the first user's adapter
        self.pad_id = load_tokenizer(path).pad_token_id
        self.optimizers: dict[str, tuple] = {}
        self.teachers: dict[str, TeacherWeights] = {}
        self.versions: dict[str, int] = {}

    def _lora_config(self):
        from peft import LoraConfig

        lora = self.cfg.model.lora
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM")

    @property
    def users(self) -> list[str]:
        return sorted(self.versions)

    def ensure(self, user: str) -> None:
        """Create ``user``'s adapter (LoRA B = 0, so it starts as the base model) with its own optimizer."""
        if check_user_id(user) in self.versions:
            return
        from peft import get_peft_model

        if self.model is None:
            self.model = get_peft_model(self.base, self._lora_config(), adapter_name=user)
            self.model.eval()
        else:
            self.model.add_adapter(user, self._lora_config())
        self._activate(user)
        self.optimizers[user] = build_optimizer(self.model, self.cfg, self.total_steps)
        self.teachers[user] = TeacherWeights(self.model, self.cfg.teacher.weights, self.cfg.teacher.ema_rate)
        self.versions[user] = 0

    def _activate(self, user: str) -> None:
        """Route forwards through ``user``'s adapter; only its tensors require grad."""
        self.model.base_model.set_adapter(user)
        for name, param in self.model.named_parameters():
            param.requires_grad_(_owner(name) == user)

    def train_step(self, user: str, pairs: list[ScoringPair]) -> dict:
        """One optimizer step of ``user``'s adapter on ``user``'s interactions (teacher = same adapter + o)."""
        if not pairs:
            raise ValueError(f"no interactions for user {user!r} in this step")
        self.ensure(user)
        self._activate(user)
        optimizer, scheduler = self.optimizers[user]
        teacher = self.teachers[user]
        with self._placed():
            stats = train_batch(self.model, pairs, teacher, self.cfg, self.pad_id)
        stats["grad_norm"] = optimizer_step(self.model, optimizer, scheduler, self.cfg.optim.max_grad_norm)
        teacher.after_step()
        self.versions[user] += 1
        return dict(stats, user=user, version=self.versions[user], interactions=len(pairs))

    def export(self, user: str) -> WeightsBlob:
        """``user``'s adapter at its current version as one blob (PEFT names; vLLM loads it as a LoRA)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=user)
        config = jsonable(self.model.peft_config[user].to_dict())
        return pack_state_dict(state, self.versions[user], "lora", config)

    def _placed(self):
        """On GPU the scoring code builds its tensors without a device: make them land on the model's."""
        return contextlib.nullcontext() if self.device.type == "cpu" else self.device

    @torch.no_grad()
    def response_logprobs(self, user: str | None, pairs: list[ScoringPair]) -> list[list[float]]:
        """log π(y_i | x, y<i) under ``user``'s adapter, or the base model for ``user=None``."""
        with self._placed():
            return self._logprobs(user, pairs)

    def _logprobs(self, user: str | None, pairs: list[ScoringPair]) -> list[list[float]]:
        batch = student_batch(pairs, self.pad_id)
        if user is None:
            if self.model is None:
                with autocast(self.base, self.cfg.model.compute_dtype):
                    lp = response_logprobs(self.base, batch, self.cfg.loss.chunk_size)
            else:
                with self.model.disable_adapter(), autocast(self.model, self.cfg.model.compute_dtype):
                    lp = response_logprobs(self.model, batch, self.cfg.loss.chunk_size)
        else:
            if user not in self.versions:
                raise KeyError(f"no adapter for user {user!r} (users: {self.users}); pass user=None for the base")
            self._activate(user)
            with autocast(self.model, self.cfg.model.compute_dtype):
                lp = response_logprobs(self.model, batch, self.cfg.loss.chunk_size)
        return [lp[i, : len(p.response)].float().tolist() for i, p in enumerate(pairs)]

    def save(self, store: AdapterStore, user: str) -> str:
        """Write ``user``'s current version atomically (a renamed temp folder, or uploaded with its state last)."""
        final = store.path(user, self.versions[user])
        with storage.atomic_folder(final, marker=STATE_FILE, prefix="adapter") as tmp:
            write_adapter(self.export(user), tmp)
            optimizer, scheduler = self.optimizers[user]
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "teacher": self.teachers[user].state_dict(), "version": self.versions[user]}, tmp / STATE_FILE)
        return final

    def load(self, user: str, folder: str | Path) -> int:
        """Restore ``user``'s adapter, optimizer, schedule and teacher from a ``save`` folder (a local path or a
        URI); returns its version."""
        with storage.local_copy(folder, "adapter") as local:
            return self._load(user, local)

    def _load(self, user: str, folder: Path) -> int:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        self.ensure(user)
        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=user)
        state = torch.load(folder / STATE_FILE, weights_only=False)
        optimizer, scheduler = self.optimizers[user]
        self._activate(user)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.teachers[user].load_state_dict(state["teacher"])
        self.versions[user] = int(state["version"])
        return self.versions[user]


def _owner(param_name: str) -> str | None:
    """The adapter a parameter belongs to (``...q_proj.lora_A.<user>.weight`` → user), or None for base weights."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            return parts[i + 1]
    return None
