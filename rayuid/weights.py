"""One policy version as one object: a packed safetensors buffer plus version, kind and checksum.

Weight sync never sends per-parameter messages: the learner packs the whole state dict (or just the LoRA adapter)
into a single buffer, it travels as one Ray object, and every engine checks the checksum of what it loaded.
"""

from __future__ import annotations

import zlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@dataclass(frozen=True)
class WeightsBlob:
    """``kind`` 'full': HF checkpoint names → tensors. 'lora': a PEFT adapter (names as PEFT saves them)."""

    version: int
    kind: str
    data: bytes
    checksum: str
    lora_config: dict = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return len(self.data)


def checksum(data: bytes) -> str:
    """CRC-32 of the buffer plus its length: catches truncation and corruption at memory speed (not a MAC)."""
    return f"{zlib.crc32(data):08x}-{len(data)}"


def pack_state_dict(state: dict[str, torch.Tensor], version: int, kind: str = "full",
                    lora_config: dict | None = None) -> WeightsBlob:
    """Contiguous CPU copies of every tensor in one safetensors buffer (tied tensors are stored once per name)."""
    if kind not in ("full", "lora"):
        raise ValueError(f"weights kind must be 'full' or 'lora', got {kind!r}")
    if kind == "lora" and not lora_config:
        raise ValueError("a LoRA weights blob needs its adapter config (PeftConfig.to_dict())")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}  # save() copies once
    data = st_save(tensors)
    return WeightsBlob(version, kind, data, checksum(data), dict(lora_config or {}))


def jsonable(obj):
    """PeftConfig.to_dict() holds sets (target_modules); JSON and vLLM want lists."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def verify(blob: WeightsBlob) -> None:
    if checksum(blob.data) != blob.checksum:
        raise ValueError(f"weights v{blob.version} are corrupt: checksum mismatch; re-publish from the learner")


def unpack(blob: WeightsBlob) -> dict[str, torch.Tensor]:
    verify(blob)
    return st_load(blob.data)


def write_adapter(blob: WeightsBlob, folder: str | Path) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that vLLM's LoRARequest loads."""
    if blob.kind != "lora":
        raise ValueError("write_adapter needs a 'lora' blob")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_model.safetensors").write_bytes(blob.data)
    (out / "adapter_config.json").write_text(json.dumps(blob.lora_config, default=list))
    return out
