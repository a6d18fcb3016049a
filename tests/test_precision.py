"""Precision chosen for the hardware (rayuid.precision) and `rayuid train --dry-run`."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from rayuid import precision
from rayuid.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CPU_JOBS = sorted(p for p in JOBS.glob("*.yaml") if "smollm2" in p.name or p.name.startswith("smoke"))
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})                     # the project's AVX2-only EPYC
ZEN4 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}               # e.g. this session's EPYC
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}
NEOVERSE_V2 = frozenset({"fp", "asimd", "sve", "sve2", "bf16", "i8mm"})


@pytest.mark.parametrize("flags, aten, onednn, native", [
    (AVX2, None, None, False),
    (ZEN4, None, None, True),
    (SAPPHIRE_RAPIDS, None, None, True),
    (NEOVERSE_V2, None, None, True),
    (AVX2 | {"avx512f", "avx512bw"}, None, None, False),   # AVX-512 without BF16 (Skylake): emulated
    (ZEN4, "avx2", None, False),                           # torch capped below AVX-512
    (ZEN4, "AVX512", None, True),
    (ZEN4, None, "AVX2", False),                           # oneDNN capped
    (ZEN4, None, "AVX512_CORE_BF16", True),
    (SAPPHIRE_RAPIDS, None, "avx512_core_amx", True),
    (frozenset(), None, None, False),
])
def test_cpu_native_bf16(flags, aten, onednn, native):
    assert precision.cpu_native_bf16(flags, aten, onednn) is native


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512_bf16\n\nflags : other\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n")
    assert precision.cpu_flags(str(x86)) == {"fpu", "sse", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(str(arm)) == {"fp", "asimd", "bf16", "sve"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_this_machine_agrees_with_its_cpuinfo(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    precision.native_bf16.cache_clear()
    try:
        flags = precision.cpu_flags()
        if not flags:
            pytest.skip("no /proc/cpuinfo here")
        assert precision.native_bf16("cpu") is bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # what a user caps torch to is what counts
        precision.native_bf16.cache_clear()
        assert precision.native_bf16("cpu") is False
    finally:
        precision.native_bf16.cache_clear()


@pytest.fixture()
def hardware(monkeypatch):
    """``hardware(native)``: pretend this machine does (or does not) compute bf16 natively."""
    def set_native(native: bool):
        monkeypatch.setattr(precision, "native_bf16", lambda device: native)
        precision._warn_emulated.cache_clear()
    yield set_native
    precision._warn_emulated.cache_clear()


def test_auto_and_explicit_choices(hardware):
    hardware(False)
    assert precision.compute_dtype("auto", "cpu", "x") == "float32"
    assert precision.master_dtype("auto", "cpu") == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.compute_dtype("float32", "cpu", "x") == "float32"
    with pytest.warns(precision.SlowPrecisionWarning,
                      match=r"model.compute_dtype=bfloat16 .*emulated.*; set model.compute_dtype=auto \(or float32\)"):
        assert precision.compute_dtype("bfloat16", "cpu", "model.compute_dtype") == "bfloat16"  # honoured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per setting: the second time is silent
        assert precision.compute_dtype("bfloat16", "cpu", "model.compute_dtype") == "bfloat16"
    hardware(True)
    assert precision.compute_dtype("auto", "cpu", "x") == "bfloat16"
    assert precision.master_dtype("auto", "cpu") == "float32"      # master weights stay fp32 on CPU
    assert precision.master_dtype("auto", "cuda") == "bfloat16"
    assert precision.master_dtype("float32", "cuda") == "float32"


@pytest.mark.parametrize("job", CPU_JOBS, ids=lambda p: p.name)
@pytest.mark.parametrize("native, want", [(False, "float32"), (True, "bfloat16")])
def test_every_shipped_cpu_job_decides_for_the_hardware(hardware, job, native, want):
    hardware(native)
    cfg = precision.decide_all(load_config(job), device="cpu")
    assert (cfg.model.dtype, cfg.model.compute_dtype) == ("float32", want)
    if cfg.ray is not None:
        assert cfg.ray.vllm.dtype == want


def test_dry_run_prints_the_decided_config_without_ray_or_models(tmp_path):
    script = ("import sys; from rayuid import precision; precision.native_bf16 = lambda d: False; "
              "from rayuid.cli import main; code = main(sys.argv[1:]); "
              "assert 'vllm' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", script, "train", str(JOBS / "online_smollm2_concise.yaml"),
                          "optim.lr=3e-5", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["dtype"] == cfg["model"]["compute_dtype"] == cfg["ray"]["vllm"]["dtype"] == "float32"
    assert cfg["optim"]["lr"] == 3e-5 and cfg["online"]["steps"] == 12
    assert out.stdout.startswith("# ") and "native_bf16" in out.stdout.splitlines()[0]
