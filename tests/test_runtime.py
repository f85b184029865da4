"""The runtime rules of preresnet.runtime: what `auto` means on a CPU, and why (config.json's reasons)."""

import json

import pytest
import torch

from preresnet import runtime as rt
from preresnet.errors import UserError

NATIVE = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EMULATED = frozenset({"avx512f", "avx512_vnni"})  # a Xeon without AVX512-BF16: oneDNN emulates bf16


@pytest.mark.parametrize("flags, found", [(NATIVE, ["avx512_bf16", "amx_bf16"]), (EMULATED, []),
                                          (frozenset({"fp", "asimd", "bf16"}), ["bf16"]), (frozenset(), [])])
def test_native_bf16_is_read_from_the_feature_flags(flags, found):
    assert rt.native_cpu_support("bf16", flags) == found


def test_the_flags_come_from_the_environment_where_set(monkeypatch):
    monkeypatch.setenv(rt.FLAGS_ENV, "avx512f, amx_bf16")
    assert rt.cpu_flags() == {"avx512f", "amx_bf16"}
    assert rt.native_cpu_support("bf16") == ["amx_bf16"] and rt.native_cpu_support("fp16") == []


@pytest.mark.parametrize("bf16_auto", [False, True])
def test_auto_amp_on_a_cpu_is_bf16_only_where_it_is_native_and_allowed(monkeypatch, bf16_auto):
    monkeypatch.setattr(rt, "CPU_BF16_AUTO", bf16_auto)
    amp, reason = rt.resolve_amp("auto", "cpu", None, NATIVE)
    assert amp == ("bf16" if bf16_auto else "off")
    assert "avx512_bf16, amx_bf16" in reason and reason.startswith("auto:")
    amp, reason = rt.resolve_amp("auto", "cpu", None, EMULATED)
    assert amp == "off" and "no native bf16" in reason


def test_explicit_and_saved_precisions_win_over_the_rule():
    assert rt.resolve_amp("bf16", "cpu", None, EMULATED) == ("bf16", "--amp bf16")
    assert rt.resolve_amp("auto", "cpu", {"amp": "bf16"}, EMULATED) == ("bf16", "as the run was started (its config.json)")
    assert rt.resolve_amp("off", "cpu", {"amp": "bf16"}, NATIVE) == ("off", "--amp off")
    with pytest.raises(UserError, match="unknown --amp"):
        rt.resolve_amp("fp8", "cpu", None, NATIVE)


@pytest.mark.parametrize("amp, flags, warned", [("bf16", EMULATED, True), ("fp16", EMULATED, True),
                                                 ("bf16", NATIVE, False), ("off", EMULATED, False)])
def test_an_emulated_precision_warns_in_one_line(monkeypatch, amp, flags, warned):
    monkeypatch.setenv(rt.FLAGS_ENV, " ".join(flags))
    lines = []
    rt.warn_if_emulated(rt.resolve_runtime("cpu", amp, loader="torch"), say=lines.append)
    assert len(lines) == int(warned)
    if warned:
        assert "\n" not in lines[0] and f"--amp {amp}" in lines[0] and "slower than fp32" in lines[0]


def test_channels_last_and_compile_auto_on_a_cpu():
    runtime = rt.resolve_runtime("cpu", "off", loader="torch")
    assert runtime.channels_last and "NHWC" in runtime.channels_last_reason
    assert runtime.compile is None  # until the schedule is known
    short = rt.settle_compile(runtime, rt.CPU_COMPILE_MIN_STEPS - 1)
    long = rt.settle_compile(runtime, rt.CPU_COMPILE_MIN_STEPS)
    assert short.compile is False and "(under)" in short.compile_reason
    assert long.compile is True and "(at least)" in long.compile_reason
    asked = rt.resolve_runtime("cpu", "off", channels_last=False, compile=True, loader="torch")
    assert rt.settle_compile(asked, 1).compile is True and asked.compile_reason == "--compile"
    assert asked.channels_last_reason == "--no-channels-last"


def test_a_resumed_run_keeps_its_layout_and_compilation_under_auto():
    saved = {"amp": "bf16", "channels_last": False, "compile": True}
    runtime = rt.resolve_runtime("cpu", "auto", loader="torch", saved=saved)
    assert (runtime.amp, runtime.channels_last, runtime.compile) == ("bf16", False, True)
    assert {runtime.amp_reason, runtime.channels_last_reason, runtime.compile_reason} == {
        "as the run was started (its config.json)"}
    # the reasons a run's config.json gives are kept: a resumed run writes the same config.json
    reasons = {"amp_reason": "auto: this CPU has no native bf16", "channels_last_reason": "--no-channels-last",
               "compile_reason": "--compile"}
    again = rt.resolve_runtime("cpu", "auto", loader="torch", saved={**saved, **reasons})
    assert {key: value for key, value in again.reasons().items() if key in reasons} == reasons
    flagged = rt.resolve_runtime("cpu", "off", channels_last=True, compile=False, loader="torch", saved=saved)
    assert (flagged.amp, flagged.channels_last, flagged.compile) == ("off", True, False)


def test_saved_runtime_reads_a_run_folder_a_checkpoint_or_a_packed_folder(tmp_path):
    assert rt.saved_runtime(tmp_path / "new") is None
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps({"runtime": {"amp": "bf16"}}))
    assert rt.saved_runtime(single) == {"amp": "bf16"}
    assert rt.saved_runtime(single / "checkpoint.pt") == {"amp": "bf16"}
    packed = tmp_path / "packed"
    (packed / "seed-1").mkdir(parents=True)
    (packed / "seed-1" / "config.json").write_text(json.dumps({"runtime": {"amp": "off", "compile": True}}))
    assert rt.saved_runtime(packed) == {"amp": "off", "compile": True}


def test_the_reasons_are_what_config_json_records():
    runtime = rt.settle_compile(rt.resolve_runtime("cpu", "off", loader="torch"), 10)
    assert set(runtime.reasons()) == {"amp_reason", "channels_last_reason", "compile_reason", "loader_reason",
                                      "fused_reason", "cuda_graphs_reason"}
    assert all(runtime.reasons().values())
    assert runtime.device == torch.device("cpu")
