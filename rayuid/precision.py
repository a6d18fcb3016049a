"""Precision chosen for the hardware a role runs on: ``auto`` → bfloat16 where it is computed natively, else float32.

Native bf16 means: a CUDA device that supports it, or a CPU with AVX512_BF16 or AMX (x86) or BF16 (Arm) that torch
is allowed to use (``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` can cap it). On other CPUs bf16 is emulated:
measured with torch 2.13 on a 2-core AVX2 EPYC, a 512×576 @ 576×1536 matmul takes 17.9 ms in fp32 and 780 ms in
bf16. An explicit ``bfloat16`` there is honoured, with one warning that says so.

Each role decides where it runs (the learner on its node, each vLLM engine on its own), so a head node without a
GPU never decides for a GPU worker. Master weights (``model.dtype: auto``) stay float32 on CPU: autocast gives the
speed, and bf16 master weights would round away AdamW updates smaller than 2^-8 of a weight.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512_BF16 / AMX, Arm BF16 (FEAT_BF16)
_ATEN_NO_BF16 = ("default", "avx2")  # ATEN_CPU_CAPABILITY values below AVX-512: torch's kernels then emulate bf16
_ONEDNN_BF16 = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL")  # ONEDNN_MAX_CPU_ISA


class SlowPrecisionWarning(UserWarning):
    """bfloat16 was asked for on hardware that emulates it."""


def device_kind() -> str:
    """'cuda' when this process sees a CUDA device, else 'cpu' (where the learner and vLLM will compute)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def torch_cpu_flags() -> frozenset[str]:
    """The bf16 features torch's own CPU probe reports (works where /proc/cpuinfo does not, e.g. macOS)."""
    import torch

    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}
    if torch.cpu.get_capabilities().get("bf16", False) if hasattr(torch.cpu, "get_capabilities") else False:
        found.add("bf16")
    return frozenset(found)


def cpu_native_bf16(flags: frozenset[str], aten_cap: str | None = None, onednn_cap: str | None = None) -> bool:
    """Pure: bf16 matmuls run natively on a CPU with these flags, unless torch/oneDNN are capped below AVX-512."""
    if aten_cap and aten_cap.strip().lower() in _ATEN_NO_BF16:
        return False
    if onednn_cap and not onednn_cap.strip().upper().startswith(_ONEDNN_BF16):
        return False
    return bool(BF16_CPU_FLAGS & flags)


@functools.lru_cache(maxsize=None)
def native_bf16(device: str) -> bool:
    """Does ``device`` ('cpu' or 'cuda') of this machine compute bf16 natively? Decided once per process."""
    if device == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    flags = torch_cpu_flags() | cpu_flags()
    return cpu_native_bf16(flags, os.environ.get("ATEN_CPU_CAPABILITY"), os.environ.get("ONEDNN_MAX_CPU_ISA"))


def compute_dtype(value: str, device: str, what: str) -> str:
    """``auto`` → bfloat16 / float32 for ``device``; an explicit choice is kept (bf16 on an emulating CPU warns)."""
    if value == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if value == "bfloat16" and not native_bf16(device):
        _warn_emulated(what, device)
    return value


def master_dtype(value: str, device: str) -> str:
    """``model.dtype: auto``: bf16 master weights on a native-bf16 GPU, float32 on CPU (see module docstring)."""
    if value != "auto":
        return value
    return "bfloat16" if device == "cuda" and native_bf16(device) else "float32"


@functools.lru_cache(maxsize=None)
def _warn_emulated(what: str, device: str) -> None:
    warnings.warn(f"{what}=bfloat16 on this {device}, which has no native bf16 (no AVX512_BF16/AMX): bf16 matmuls are "
                  f"emulated, ~20-40x slower than float32; set {what}=auto (or float32)", SlowPrecisionWarning,
                  stacklevel=3)


def decide_model(cfg, device: str | None = None):
    """A copy of ``cfg`` (TrainConfig) with ``model.dtype``/``model.compute_dtype`` decided for ``device``."""
    device = device or device_kind()
    model = cfg.model.model_copy(update={"dtype": master_dtype(cfg.model.dtype, device),
                                         "compute_dtype": compute_dtype(cfg.model.compute_dtype, device,
                                                                        "model.compute_dtype")})
    return cfg.model_copy(update={"model": model})


def decide_engine(settings, device: str | None = None):
    """A copy of ``EngineSettings`` with ``dtype`` decided for the device the engine runs on."""
    device = device or device_kind()
    return settings.model_copy(update={"dtype": compute_dtype(settings.dtype, device, "ray.vllm.dtype")})


def decide_all(cfg, device: str | None = None):
    """Every ``auto`` of ``cfg`` decided for this machine (what ``rayuid train --dry-run`` prints)."""
    device = device or device_kind()
    out = decide_model(cfg, device)
    if out.ray is not None:
        out = out.model_copy(update={"ray": out.ray.model_copy(update={"vllm": decide_engine(out.ray.vllm, device)})})
    return out


def model_report(cfg) -> dict:
    """A learner's decided dtypes and the hardware that decided them (actor start lines, summaries)."""
    return {"dtype": cfg.model.dtype, "compute_dtype": cfg.model.compute_dtype, **describe()}


def describe(device: str | None = None) -> dict:
    """What decided it: the device and whether it computes bf16 natively (for actor start lines and summaries)."""
    device = device or device_kind()
    return {"device": device, "native_bf16": native_bf16(device)}
