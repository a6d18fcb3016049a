"""The whole job (``TrainConfig``), loading it from YAML with ``key=value`` overrides, and its field docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rayuid.config.method import (
    CheckpointSettings,
    DataSettings,
    LossSettings,
    ModelSettings,
    OptimSettings,
    StrictModel,
    TeacherSettings,
    TemplateSettings,
)
from rayuid.config.online import OnlineSettings
from rayuid.config.system import RaySettings


class TrainConfig(StrictModel):
    run_dir: str = "runs/offline"
    """Output folder: config.yaml, metrics.jsonl, summary.json and checkpoints/ (what checkpoint.resume reads)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers that get every metrics record, the held-out eval points and the plots (any subset;
    where each writes: rayuid.records.trackers). Empty: metrics.jsonl and PNGs only."""
    run_name: str | None = None
    """The run's name in the trackers (default: the run_dir's folder name)."""
    seed: int = 42
    """Seeds the data order, the prompt draws, the sampling and torch (every random draw derives from it)."""
    threads: int | None = Field(None, ge=1)
    """torch threads of the offline trainer and of each learner actor (overrides ray.learner.threads); None =
    torch's default offline, ray.learner's on Ray."""
    model: ModelSettings = ModelSettings()
    """The policy: base model, precision and full fine-tuning or LoRA."""
    data: DataSettings = DataSettings()
    """Offline runs: the logged chats to learn from (online runs use online.prompts)."""
    template: TemplateSettings = TemplateSettings()
    """How prompts, hindsight contexts and replies become tokens."""
    loss: LossSettings = LossSettings()
    """The self-distillation objective."""
    teacher: TeacherSettings = TeacherSettings()
    """Which weights the hindsight teacher scores with."""
    optim: OptimSettings = OptimSettings()
    """Optimizer, learning-rate schedule and batch sizes."""
    checkpoint: CheckpointSettings = CheckpointSettings()
    """When checkpoints are written, kept and resumed from."""
    ray: RaySettings | None = None
    """Present = the Ray system (needed for online runs); None = the single-process offline trainer."""
    online: OnlineSettings | None = None
    """Present = online SDPO from simulated users; None = offline training on data.paths."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.loss.ratio_clip is not None and self.loss.kind != "sampled_token":
            raise ValueError("loss.ratio_clip applies to loss.kind=sampled_token only; remove it or change the kind")
        if self.online is not None and self.ray is None:
            raise ValueError("online training runs on the Ray system: add a `ray:` block (it may be empty: `ray: {}`)")
        if self.ray is not None:
            need = self.template.max_prompt_tokens + self.template.max_response_tokens
            if need > self.ray.vllm.max_model_len:
                raise ValueError(f"ray.vllm.max_model_len={self.ray.vllm.max_model_len} cannot hold a prompt of "
                                 f"template.max_prompt_tokens + a reply of template.max_response_tokens ({need}); "
                                 "raise max_model_len or lower the template limits")
        if self.online is not None and self.online.eval_every and not self.online.heldout_prompts:
            raise ValueError("online.eval_every needs online.heldout_prompts > 0 (the prompts to evaluate on)")
        if self.online is not None and self.online.sampling.max_tokens > self.template.max_response_tokens:
            raise ValueError("online.sampling.max_tokens exceeds template.max_response_tokens; lower the first or "
                             "raise the second")
        if self.ray is not None and self.model.lora is not None:
            ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRAConfig accepts
            if self.ray.vllm.max_lora_rank not in ranks or self.model.lora.r > self.ray.vllm.max_lora_rank:
                raise ValueError(f"ray.vllm.max_lora_rank={self.ray.vllm.max_lora_rank} must be one of {ranks} and "
                                 f">= model.lora.r={self.model.lora.r}")
        if self.online is not None and self.online.users:
            if self.model.lora is None:
                raise ValueError("online.users trains one LoRA adapter per user: set model.lora (e.g. {r: 16})")
            if self.ray.teacher_in != "learner":
                raise ValueError("online.users scores the hindsight teacher with each user's adapter in the learner: "
                                 "set ray.teacher_in=learner")
        if self.ray is not None and self.ray.teacher_in == "vllm":
            if self.teacher.weights != "live":
                raise ValueError(f"teacher.weights={self.teacher.weights} needs ray.teacher_in=learner: the vLLM "
                                 "engines serve the live policy only")
            if self.loss.kind != "sampled_token":
                raise ValueError(f"loss.kind={self.loss.kind} needs full teacher distributions; set "
                                 "ray.teacher_in=learner (vLLM scoring returns sampled-token log-probs)")
        return self

    @model_validator(mode="after")
    def _check_replicas(self) -> "TrainConfig":
        if self.ray is None:
            return self
        if self.ray.user_workers > 1 and (self.online is None or self.online.user.kind != "llm"):
            raise ValueError("ray.user_workers > 1 needs an LLM user (online.user.kind=llm): a rule-based user is "
                             "one actor; remove ray.user_workers")
        if self.ray.judge_workers > 1 and (self.online is None or self.online.judge is None):
            raise ValueError("ray.judge_workers > 1 needs online.judge; set it or remove ray.judge_workers")
        return self


def _models_in(annotation) -> list[tuple[str, type[BaseModel]]]:
    """(path suffix, model) for each model a field holds: itself, optionally, or as list items (suffix `[]`)."""
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    suffix = "[]" if get_origin(annotation) is list else ""
    return [(suffix + sub, model) for arg in get_args(annotation) for sub, model in _models_in(arg)]


def field_docs(model: type[BaseModel] = TrainConfig, prefix: str = "",
               defaults: BaseModel | None = None) -> list[tuple[str, str, str, str]]:
    """(dotted path, type, default, description) of every field; a nested model's fields follow its own row.

    ``defaults``: the instance a nested block defaults to, whose values are shown (``ray.user`` has num_cpus 0).
    """
    rows = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        required = defaults is None and info.is_required()
        value = getattr(defaults, name) if defaults is not None else \
            None if required else info.get_default(call_default_factory=True)
        shown = "required" if required else "{…}" if isinstance(value, BaseModel) else repr(value)
        kind = ann.__name__ if get_origin(ann) is None and isinstance(ann, type) else str(ann)
        kind = re.sub(r"rayuid\.config\.\w+\.|typing\.", "", kind)
        rows.append((prefix + name, kind, shown, " ".join((info.description or "").split())))
        for suffix, sub in _models_in(ann):
            rows += field_docs(sub, f"{prefix}{name}{suffix}.", value if isinstance(value, sub) else None)
    return rows


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the reason and the fix."""


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-5", "model.lora.r=8"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. optim.lr=1e-5")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below a scalar; check the key path")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: list[str] = (), model: type[BaseModel] = TrainConfig) -> BaseModel:
    """Read YAML, apply overrides, validate; errors list every bad key with its location."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are in jobs/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level, got {type(raw).__name__}")
    merged = _merge(raw, parse_overrides(list(overrides)))
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid config {path}:\n" + "\n".join(lines)) from None


def dump_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
