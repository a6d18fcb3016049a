"""Every shipped YAML parses; overrides apply; mistakes are errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from rayuid.config import (
    ConfigError,
    ExtractConfig,
    JudgeSettings,
    Resources,
    TrainConfig,
    UserSpec,
    field_docs,
    load_config,
    parse_overrides,
)

RUNTIME_ENV = Path(__file__).resolve().parents[1] / "jobs" / "runtime_env.yaml"  # for `ray job submit`, not a job
JOBS = sorted(p for p in RUNTIME_ENV.parent.glob("*.yaml") if p != RUNTIME_ENV)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)


def test_the_shipped_runtime_env_is_valid_for_ray_and_keeps_runs_and_venvs_out():
    import yaml
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load(RUNTIME_ENV.read_text()))   # Ray's own validation of every field
    assert {"runs/", ".venv/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert not any(k.startswith("AWS_SECRET") or k.endswith("TOKEN") for k in env["env_vars"])  # no secrets


def test_paper_offline_setting():
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "offline_wildfeedback_qwen3_8b.yaml")
    assert cfg.optim.lr == 2e-6 and cfg.optim.schedule == "cosine" and cfg.optim.warmup_ratio == 0.05
    assert cfg.optim.epochs == 2
    assert cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * cfg.ray.learners == 32
    assert cfg.loss.ignore_first_k == 2 and cfg.teacher.weights == "live"


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: x\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["optim.lr=3e-4", "model.lora.r=8", "data.paths=[a.jsonl, b.jsonl]", "loss.adv_clip="])
    assert cfg.optim.lr == 3e-4 and cfg.model.lora.r == 8 and cfg.data.paths == ["a.jsonl", "b.jsonl"]
    assert cfg.loss.adv_clip is None
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_mistakes_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(path)
    path.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(path)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("loss:\n  kind: jsd\n  ratio_clip: 0.2\n")
    with pytest.raises(ConfigError, match="ratio_clip"):
        load_config(path)


def test_max_staleness_is_what_the_driver_does():
    """0 (on-policy) or 1 (generate one step ahead); a deeper pipeline is refused, not silently run as 1."""
    job = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
    assert load_config(job, ["online.max_staleness=1"]).online.max_staleness == 1
    with pytest.raises(ConfigError, match="online.max_staleness"):
        load_config(job, ["online.max_staleness=2"])


def test_unreachable_cluster_is_a_clear_error():
    import ray

    from rayuid.system.actors.spawn import ClusterError, connect

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    with pytest.raises(ClusterError, match="ray start --head"):
        connect("127.0.0.1:1", None)


def test_per_user_settings_are_validated_with_the_fix_in_the_message():
    from rayuid.config import TrainConfig

    base = {"model": {"name": "x", "lora": {"r": 8}}, "template": {"max_prompt_tokens": 64, "max_response_tokens": 256},
            "ray": {"teacher_in": "learner", "vllm": {"max_lora_rank": 8}},
            "online": {"users": [{"id": "a", "personas": ["concise"]}]}}
    assert TrainConfig.model_validate(base).online.users[0].persona_params("concise") == {}
    cases = [
        ({"online": {"users": [{"id": "a", "personas": ["concise"]}] * 2}}, "unique"),
        ({"online": {"users": [{"id": "a b", "personas": ["concise"]}]}}, "pattern"),
        ({"online": {"users": [{"id": "a", "personas": ["nope"]}]}}, "known personas"),
        ({"online": {"users": [{"id": "a", "personas": ["concise"], "params": {"concise": {"min_words": 3}}}]}},
         "no parameter"),
        ({"online": {"users": [{"id": "a", "personas": ["concise"], "params": {"detailed": {}}}]}}, "not among"),
        ({"online": {"users": [{"id": "a", "personas": ["concise", "detailed"]}]}}, "switch_every"),
        ({"online": {"users": [{"id": "a", "personas": ["concise", "detailed"]}], "switch_every": 3,
                     "eval_every": 2, "heldout_prompts": 2}}, "multiple of"),
        ({"model": {"name": "x"}}, "model.lora"),
        ({"ray": {"teacher_in": "vllm", "vllm": {"max_lora_rank": 8}}}, "ray.teacher_in=learner"),
        ({"ray": {"teacher_in": "learner", "vllm": {"max_lora_rank": 4}}}, "max_lora_rank"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig.model_validate({**base, **change})


def test_a_length_persona_the_replies_cannot_reach_is_refused():
    from rayuid.config import TrainConfig

    raw = {"model": {"name": "x", "lora": {"r": 8}}, "template": {"max_prompt_tokens": 64, "max_response_tokens": 256},
           "ray": {"teacher_in": "learner", "vllm": {"max_lora_rank": 8}},
           "online": {"sampling": {"max_tokens": 128},
                      "users": [{"id": "b", "personas": ["detailed"], "params": {"detailed": {"min_words": 120}}}]}}
    with pytest.raises(ValueError, match="allows about 96"):
        TrainConfig.model_validate(raw)
    raw["online"]["sampling"]["max_tokens"] = 256
    assert TrainConfig.model_validate(raw).online.users[0].persona_params("detailed") == {"min_words": 120}


def _nested_models(annotation, in_list: bool = False):
    """(path suffix, model) for each pydantic model an annotation holds, directly, optionally or as list items."""
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("[]" if in_list else "", annotation)]
    in_list = in_list or get_origin(annotation) is list
    return [found for arg in get_args(annotation) for found in _nested_models(arg, in_list)]


def _walk(model, prefix: str = "", models: set | None = None) -> dict:
    """Every field of ``model`` and of every model nested in it, by dotted path, each parent before its fields."""
    fields = {}
    for name, info in model.model_fields.items():
        fields[prefix + name] = info
        for suffix, sub in _nested_models(info.annotation):
            if models is not None:
                models.add(sub)
            fields.update(_walk(sub, f"{prefix}{name}{suffix}.", models))
    return fields


def test_every_config_field_is_documented_in_the_schema():
    models: set = set()
    fields = _walk(TrainConfig, models=models)
    assert {ExtractConfig, Resources, UserSpec, JudgeSettings} <= models
    assert "data.extract.max_line_bytes" in fields and "online.users[].personas" in fields
    assert [path for path, info in fields.items() if not (info.description or "").strip()] == []
    schema = TrainConfig.model_json_schema()
    assert set(schema["$defs"]) == {m.__name__ for m in models}  # the walk reached every model of the schema
    blocks = [("TrainConfig", schema), *schema["$defs"].items()]
    undocumented = [f"{model}.{key}" for model, block in blocks for key, prop in block["properties"].items()
                    if not prop.get("description", "").strip()]
    assert undocumented == []
    distinct = {id(info) for info in fields.values()}  # a model used in several places (Resources) counts once
    assert sum(len(block["properties"]) for _, block in blocks) == len(distinct)
    rows = field_docs()
    assert [row[0] for row in rows] == list(fields) and len(rows) == len(fields)
    assert all(row[1] and row[2] and row[3] for row in rows)
    assert dict((row[0], row[2]) for row in rows)["ray.user.num_cpus"] == "0.0"  # a nested block's own default


# Hub datasets the shipped jobs read that need more than a name (datasets 5.x; checked without downloading):
# several configs → one must be named; a loading-script dataset → the hub's parquet conversion.
MULTI_CONFIG = {"openai/summarize_from_feedback": {"comparisons", "axis"},
                "microsoft/WildFeedback": {"wildfeedback", "sat_dsat_annotation", "user_preference"}}
SCRIPT_DATASETS = {"openai/summarize_from_feedback"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_names_data_that_loads(path):
    from rayuid.data.readers import as_source

    cfg = load_config(path)
    sources = (cfg.online.prompts if cfg.online is not None else []) + (cfg.data.paths if cfg.online is None else [])
    for source in sources:
        if isinstance(source, str) and source.startswith(("rayuid:", "prefeval:")):
            continue
        spec = as_source(source.model_dump() if not isinstance(source, str) else source)
        if spec.name in MULTI_CONFIG:
            assert spec.config in MULTI_CONFIG[spec.name], f"{path.name}: {spec.name} needs one of its configs"
        if spec.name in SCRIPT_DATASETS:
            assert spec.revision == "refs/convert/parquet", f"{path.name}: {spec.name} is a script dataset"


def test_user_and_judge_replicas_need_an_llm_to_replicate():
    job = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
    llm = load_config(job, ["online.user={kind: llm, persona: concise}", "ray.user_workers=2"])
    assert llm.ray.user_workers == 2 and llm.ray.judge_workers == 1
    with pytest.raises(ConfigError, match="ray.user_workers > 1 needs an LLM user"):
        load_config(job, ["ray.user_workers=2"])                         # smoke.yaml's user is rule-based
    with pytest.raises(ConfigError, match="ray.judge_workers > 1 needs online.judge"):
        load_config(job, ["ray.judge_workers=3"])
