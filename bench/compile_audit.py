"""Compile audit: every Triton kernel specialization the fused networks launch, compiled for GPUs
that are not here, with its registers, spills, shared memory and tensor-core instructions.

    python -m bench.compile_audit                  # registry networks + benchmark shapes, sm_90 and sm_80, 3 dtypes
    python -m bench.compile_audit --quick          # one launch per distinct kernel/constexpr combination
    python -m bench.compile_audit --json FILE      # the rows as JSON

How: a child process, under TRITON_INTERPRET=1 (so the launchers accept CPU tensors), replaces every
Triton kernel of `kernels.preact_conv` by a proxy whose `kernel[grid](*args, **kwargs)` records the
launch and runs nothing, and the launchers' `launch_target` by an H100's (so they choose the GPU's
tiles and weight-gradient split), then runs a fused training step (forward + backward, batch 128)
of every registry network, an eval forward, and the benchmark workloads of `bench.workloads`,
under autocast bf16 / fp16 and in fp32. Each launch becomes a compile signature through Triton's own
JIT binder for a CUDA target (pointer dtypes, the specialisation of integers equal to 1 or divisible
by 16, constexprs, num_warps / num_stages), so the audit follows the launchers whatever their
argument lists. The distinct specializations are then compiled with `triton.compile` for sm_90 and
sm_80 (two processes, a fresh Triton cache in a temporary folder), and ptxas's own report (`-v`,
as Triton runs it) gives registers, spill stores/loads; the PTX tells whether wgmma / mma are used.

Exit status 1 on a compile error, on shared memory beyond the arch's per-block limit (the launch
would fail), on any spill in bf16/fp16, or on a bf16/fp16 kernel with a tl.dot (a conv) but no
tensor-core instructions; fp32 spills are reported, not failed (exact IEEE FMAs, not trained in).

Triton, torch and the kernels are imported inside the functions each process runs, not here: the
recording child must import them with TRITON_INTERPRET=1 already set, the compiling processes
without it, and the parent imports neither.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("preresnet.kernels.preact_conv",)
ARCHS = {"sm_90": 90, "sm_80": 80}
# the most shared memory one block may use (opt-in), bytes: H100/H200 227 KiB, A100 163 KiB; a kernel
# compiled with more fails at launch ("out of resource: shared memory"), which ptxas does not report
SHARED_LIMIT = {"sm_90": 232448, "sm_80": 166912}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
EMULATED_GPU = "NVIDIA H100 80GB HBM3"  # the GPU whose launches are recorded
EMULATED_MULTIPROCESSORS = 132  # that GPU's (an H200's too): the weight gradient's split is sized to them
BATCH = 128


# --- recording (child process, TRITON_INTERPRET=1) ------------------------------------------------------


def _jsonable(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else {"repr": repr(value)}


def _install_proxies(recorder: SimpleNamespace) -> list[str]:
    """Replace every Triton kernel of KERNEL_MODULES by a recording proxy; returns their names."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    names = []

    class Proxy:
        compile_audit_proxy = True

        def __init__(self, module, name, kernel):
            self.module, self.name, self.kernel = module, name, kernel
            self.jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
            self.binder = create_function_from_signature(self.jit.signature, self.jit.params, backend)

        def __getitem__(self, grid):
            return self.run

        def run(self, *args, **kwargs):
            bound, specialization, _ = self.binder(*args, **kwargs)
            _, signature, constexprs, attrs = self.jit._pack_args(backend, kwargs, bound, specialization, {})
            arg_names = list(bound)
            spec = {
                "module": self.module, "kernel": self.name, "dtype": recorder.dtype, "signature": signature,
                "constexprs": {arg_names[path[0]]: _jsonable(v) for path, v in constexprs.items() if len(path) == 1},
                "attrs": [[list(path), value] for path, value in sorted(attrs.items())],
                "options": {k: kwargs[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs},
            }
            sizes = {name: int(v) for name, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)
                     and signature.get(name) != "constexpr"}
            # the first launch's sizes stand for the spec's
            entry = recorder.launches.setdefault(json.dumps(spec, sort_keys=True),
                                                 {**spec, "contexts": {}, "layers": {}, "sizes": sizes})
            entry["contexts"].setdefault(recorder.context, None)
            entry["layers"].update(dict.fromkeys(self.layers(spec["constexprs"], sizes)))

        def layers(self, constexprs, sizes):
            """The layer keys of a launch: by its shape (backward launches run after every forward),
            else the layer whose forward is running."""
            running = [recorder.layer] if recorder.layer else []
            try:
                shape = (sizes["C_IN"], sizes["H"], sizes["W"], sizes["C_OUT"], constexprs["KH"], constexprs["STRIDE"],
                         bool(constexprs["PROLOGUE"]))
            except KeyError:
                return running
            return list(recorder.layer_index.get(shape, {})) or running

    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in list(vars(module).items()):
            value = value.kernel if getattr(value, "compile_audit_proxy", False) else value
            if type(value).__name__ in ("JITFunction", "InterpretedFunction"):  # helpers too: harmless
                setattr(module, name, Proxy(module_name, name, value))
                names.append(name)
    return names


def _record_layer(recorder: SimpleNamespace) -> None:
    """Note each fused layer's signature key (kernels.dispatch.record is called before its launches)."""
    import preresnet.kernels.layers as layers
    import preresnet.kernels.dispatch as dispatch

    original = layers.record

    def record(x, conv, prologue, residual):
        recorder.layer = dispatch.ConvSignature(x.shape[1], conv.out_channels, conv.kernel_size[0], conv.stride[0],
                                                x.shape[2], x.shape[3], prologue, residual).key
        shape = (x.shape[1], x.shape[2], x.shape[3], conv.out_channels, conv.kernel_size[0], conv.stride[0], bool(prologue))
        recorder.layer_index.setdefault(shape, {})[recorder.layer] = None
        return original(x, conv, prologue, residual)

    layers.record = record


def _launch_as_on_the_gpu() -> None:
    """Make the launchers size every launch as on EMULATED_GPU, whatever the tensors' device: its
    multiprocessors split the weight gradient, and its tiles are the launch configurations' (the
    interpreter's are larger, for the CPU's speed)."""
    import preresnet.kernels.preact_conv as preact_conv

    gpu = preact_conv.LaunchTarget(multiprocessors=EMULATED_MULTIPROCESSORS, interpreter=False)
    preact_conv.launch_target = lambda device: gpu


def record_launches(dtypes=tuple(DTYPES), networks=None, batch: int = BATCH, benchmarks: bool = True) -> list[dict]:
    """The distinct kernel launches (compile specs) of the workloads; must run with TRITON_INTERPRET=1,
    in a process of its own (it replaces the kernels and the launchers' `launch_target`)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record_launches needs TRITON_INTERPRET=1 set before triton is imported")
    import torch
    import torch.nn.functional as F

    from preresnet import get_model

    # launches: spec key -> spec; layer_index: (C_IN, H, W, C_OUT, KH, STRIDE, PROLOGUE) -> layer keys
    recorder = SimpleNamespace(launches={}, context="", dtype="", layer=None, layer_index={})
    if not _install_proxies(recorder):
        raise RuntimeError(f"no Triton kernels found in {KERNEL_MODULES}")
    _record_layer(recorder)
    _launch_as_on_the_gpu()
    networks = list(networks or distinct_networks())
    torch.set_flush_denormal(True)  # the tensors are uninitialised: denormal garbage would be slow
    torch.manual_seed(0)
    with torch.inference_mode(False):
        for short in dtypes:
            dtype = getattr(torch, DTYPES[short])
            recorder.dtype = short
            amp = (lambda d=dtype: torch.autocast("cpu", dtype=d)) if dtype != torch.float32 else contextlib.nullcontext
            for name in networks:
                model = get_model(name, fused=True).to(memory_format=torch.channels_last).train()
                x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
                recorder.context = f"{name} train"
                with amp():
                    loss = F.cross_entropy(model(x).float(), torch.zeros(batch, dtype=torch.long))
                loss.backward()
                recorder.context = f"{name} eval"
                with amp(), torch.no_grad():
                    model.eval()(x)
                del model
            if benchmarks:
                _record_benchmarks(recorder, dtype, batch)
    return list(recorder.launches.values())


def distinct_networks() -> list[str]:
    """The registry networks, leaving out each whose fused layers (kernels.dispatch.ConvSignature, found
    on the meta device) are all layers of a smaller network already kept: the launches depend on
    the layer signatures (and the batch), not on how often a layer repeats. PreResNet-20 stands for
    PreResNet-56 and -110, PreResNet-164 for PreResNet-1001."""
    from preresnet.kernels.dispatch import conv_signatures
    from preresnet import get_model, list_models

    found = []
    for name in list_models():
        with __import__("torch").device("meta"):
            model = get_model(name, fused=True)
        keys = {s.key for s in conv_signatures(model).values()}
        found.append((sum(p.numel() for p in model.parameters()), name, keys))
    kept, covered = [], set()
    for _, name, keys in sorted(found):
        if not keys <= covered:
            kept.append(name)
            covered |= keys
    return kept


def _record_benchmarks(recorder: SimpleNamespace, dtype, batch: int) -> None:
    from bench import workloads

    recorder.context = "bench layer path"
    for signature in workloads.layer_signatures():
        workloads.conv_path_step(signature, "triton", "cpu", batch, dtype)()
    if dtype == workloads.torch.bfloat16:  # the unit benchmarks run bf16 only
        recorder.context = "bench unit"
        for shape, layer_only, backward in itertools.product(workloads.unit_shapes(), (False, True), (False, True)):
            workloads.unit_step(shape, "fused", "cpu", batch, backward, layer_only)()


# --- compiling (worker processes, no interpreter) -------------------------------------------------------

PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
TENSOR_CORE = (("wgmma", re.compile(r"\bwgmma\.mma_async")), ("mma", re.compile(r"\bmma\.sync")))


def compile_spec(spec: dict, arch: str) -> dict:
    """Compile one recorded spec for an arch ("sm_90"): registers, spills, shared memory, tensor cores."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {"arch": arch}
    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        if type(kernel).__name__ != "JITFunction":
            raise RuntimeError(f"{spec['kernel']} is a {type(kernel).__name__}: run the compile step without TRITON_INTERPRET")
        attrs = {tuple(path): value for path, value in spec["attrs"]}
        source = ASTSource(fn=kernel, signature=spec["signature"], constexprs=dict(spec["constexprs"]), attrs=attrs)
        log = io.StringIO()
        previous = triton.knobs.nvidia.dump_ptxas_log
        triton.knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=dict(spec["options"]))
        finally:
            triton.knobs.nvidia.dump_ptxas_log = previous
        text = log.getvalue()
        regs, spill = PTXAS_REGS.search(text), PTXAS_SPILL.search(text)
        if regs is None or spill is None:
            raise RuntimeError(f"no ptxas report for {spec['kernel']} (a cached compile?): {text[-300:]!r}")
        ptx = compiled.asm["ptx"]
        out.update(registers=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                   spill_loads=int(spill.group(3)), shared=int(compiled.metadata.shared),
                   num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                   tensor_core=next((name for name, pattern in TENSOR_CORE if pattern.search(ptx)), None),
                   has_dot="tt.dot" in compiled.asm["ttir"])
    except Exception as exc:  # reported as a row and a failure
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def backend_missing() -> str | None:
    """Why the CUDA backend of Triton (with its ptxas) is not usable here, or None."""
    try:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas

        if not hasattr(triton, "knobs"):
            return f"triton {triton.__version__} is older than the audit needs (3.4+: triton.knobs)"
        get_ptxas(90).path  # noqa: B018
    except Exception as exc:
        return f"Triton's CUDA backend or its ptxas is missing: {exc!r}"[:300]
    return None


def quick_subset(specs: list[dict]) -> list[dict]:
    """One spec per distinct (kernel, dtype, pointer types, constexprs, options): integer
    divisibility aside, that is everything that changes the generated code."""
    chosen: dict[str, dict] = {}
    for spec in specs:
        key = json.dumps([spec["kernel"], spec["dtype"], spec["signature"], spec["constexprs"], spec["options"]],
                         sort_keys=True)
        chosen.setdefault(key, spec)
    return list(chosen.values())


def ci_subset(specs: list[dict], low_archs=(("bf16", "sm_90"), ("fp16", "sm_80")), fp32_arch: str = "sm_90") -> list[dict]:
    """The CI's share of the audit: every kernel and every distinct combination of constexprs and
    launch options in bf16/fp16, once per arch: bf16 and fp16 launch the same constexprs and
    generate the same code but for the element type, so a combination is compiled as bf16 for
    sm_90 and as fp16 for sm_80 (as the other when only one was launched). fp32 (exact IEEE dots, no
    tensor cores; spills reported, not failed): the hardest launch per kernel and conv geometry, for
    fp32_arch, to catch compile errors."""
    groups: dict[str, dict[str, dict]] = {}
    for spec in quick_subset([s for s in specs if s["dtype"] != "fp32"]):
        key = json.dumps([spec["kernel"], spec["constexprs"], spec["options"]], sort_keys=True)
        groups.setdefault(key, {}).setdefault(spec["dtype"], spec)
    chosen = [{**(by_dtype.get(dtype) or next(iter(by_dtype.values()))), "archs": [arch]}
              for by_dtype in groups.values() for dtype, arch in low_archs]
    chosen += [{**spec, "archs": [fp32_arch]} for spec in worst_cases([s for s in specs if s["dtype"] == "fp32"])]
    return chosen


def worst_cases(specs: list[dict]) -> list[dict]:
    """Per kernel, dtype and conv geometry (KH, STRIDE): the likeliest launch to spill (largest blocks, most flags)."""
    best: dict[str, dict] = {}
    for spec in specs:
        c = spec["constexprs"]
        key = json.dumps([spec["kernel"], spec["dtype"], c.get("KH"), c.get("STRIDE")], sort_keys=True)
        blocks = math.prod(v for name, v in c.items() if name.startswith("BLOCK") and isinstance(v, int))
        weight = (blocks, sum(1 for v in c.values() if v is True))
        if key not in best or weight > best[key][0]:
            best[key] = (weight, spec)
    return [spec for _, spec in best.values()]


# --- driver ---------------------------------------------------------------------------------------------


def run_recorder(dtypes, networks, batch: int, benchmarks: bool) -> list[dict]:
    """record_launches in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.json"
        command = [sys.executable, "-m", "bench.compile_audit", "--record-to", str(out), "--dtypes", ",".join(dtypes),
                   "--batch", str(batch)]
        command += ["--networks", ",".join(networks)] if networks else []
        command += [] if benchmarks else ["--no-benchmarks"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"recording the launches failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def audit(specs: list[dict], archs=tuple(ARCHS), jobs: int = 2) -> list[dict]:
    """Compile every spec for every arch; one row per (spec, arch)."""
    import multiprocessing

    todo = [(spec, arch) for spec in specs for arch in spec.get("archs", archs)]
    # patch.dict: os.environ is restored on the way out
    with tempfile.TemporaryDirectory(prefix="compile-audit-") as cache, mock.patch.dict(os.environ):
        os.environ.pop("TRITON_INTERPRET", None)  # the workers compile: they must see JITFunctions
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: ptxas reports only what it compiles
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(compile_spec, [spec for spec, _ in todo], [arch for _, arch in todo], chunksize=4)
            return [{"spec": spec, **result} for (spec, _), result in zip(todo, results)]


def failures(rows: list[dict]) -> list[str]:
    problems = []
    for row in rows:
        spec, where = row["spec"], f"{row['spec']['kernel']} {describe(row['spec'])} {row['spec']['dtype']} {row['arch']}"
        if "error" in row:
            problems.append(f"{where}: does not compile: {row['error']}")
            continue
        low = spec["dtype"] in ("bf16", "fp16")
        if row["shared"] > SHARED_LIMIT.get(row["arch"], 1 << 30):
            problems.append(f"{where}: needs {row['shared']} B of shared memory, more than the "
                            f"{SHARED_LIMIT[row['arch']]} B a block may have: it would not launch")
        if low and (row["spill_stores"] or row["spill_loads"]):
            problems.append(f"{where}: spills {row['spill_stores']} B stores / {row['spill_loads']} B loads "
                            f"at {row['registers']} registers")
        if low and row["has_dot"] and not row["tensor_core"]:
            problems.append(f"{where}: tl.dot without tensor-core instructions")
    return problems


def describe(spec: dict) -> str:
    """The constexprs that tell specializations apart, compactly."""
    c, options = spec["constexprs"], spec.get("options", {})
    flags = "+".join(name.lower().replace("has_", "")
                     for name in ("PROLOGUE", "HAS_RESIDUAL", "EMIT_STATS") if c.get(name))
    parts = [f"k{c['KH']}s{c.get('STRIDE', 1)}" if "KH" in c else None, flags or None,
             "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK")),
             f"w{options.get('num_warps', '-')}s{options.get('num_stages', '-')}" if options else None]
    return " ".join(part for part in parts if part is not None)


def table(rows: list[dict]) -> str:
    lines = ["| kernel | specialization (k/stride, flags, blocks, warps/stages) | dtype | arch | registers | spill B "
             "(st/ld) | shared B | tensor cores | layers |",
             "| --- | --- | --- | --- | ---: | --- | ---: | --- | --- |"]
    for row in sorted(rows, key=lambda r: (r["spec"]["kernel"], r["spec"]["dtype"], describe(r["spec"]), r["arch"])):
        spec = row["spec"]
        layers = list(spec.get("layers", {}))
        where = (layers[0] + (f" (+{len(layers) - 1})" if len(layers) > 1 else "")) if layers else ", ".join(spec.get("contexts", ()))[:40]
        if "error" in row:
            lines.append(f"| {spec['kernel']} | {describe(spec)} | {spec['dtype']} | {row['arch']} | ERROR: {row['error'][:120]} | | | | {where} |")
            continue
        spill = f"{row['spill_stores']}/{row['spill_loads']}" if row["spill_stores"] or row["spill_loads"] else "0"
        tc = row["tensor_core"] or ("none" if row["has_dot"] else "-")
        lines.append(f"| {spec['kernel']} | {describe(spec)} | {spec['dtype']} | {row['arch']} | {row['registers']} | "
                     f"{spill} | {row['shared']} | {tc} | {where} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per kernel and dtype: specializations, register range, spilling ones, tensor-core instruction."""
    groups: dict = {}
    for row in rows:
        spec = row["spec"]
        group = groups.setdefault((spec["kernel"], spec["dtype"]), {"n": 0, "regs": [], "spills": 0, "errors": 0, "tc": set()})
        group["n"] += 1
        if "error" in row:
            group["errors"] += 1
            continue
        group["regs"].append(row["registers"])
        group["spills"] += bool(row["spill_stores"] or row["spill_loads"])
        group["tc"].add(f"{row['arch']}:{row['tensor_core'] or ('none' if row['has_dot'] else '-')}")
    lines = ["| kernel | dtype | compiles (spec x arch) | registers | spilling | errors | tensor cores |",
             "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for (kernel, dtype), g in sorted(groups.items()):
        regs = f"{min(g['regs'])}-{max(g['regs'])}" if g["regs"] else "-"
        lines.append(f"| {kernel} | {dtype} | {g['n']} | {regs} | {g['spills']} | {g['errors']} | {', '.join(sorted(g['tc']))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, of " + ", ".join(ARCHS))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of " + ", ".join(DTYPES))
    parser.add_argument("--networks", help="comma-separated registry names (default: all)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--no-benchmarks", action="store_true", help="only the registry networks")
    parser.add_argument("--quick", action="store_true",
                        help="one launch per distinct kernel / dtype / constexpr / options combination")
    parser.add_argument("--worst-cases", action="store_true",
                        help="per kernel, dtype and conv geometry only the launch with the largest blocks")
    parser.add_argument("--ci", action="store_true", help="the CI test's subset (see ci_subset)")
    parser.add_argument("--kernels", help="comma-separated kernel names to audit (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--full-table", action="store_true", help="print every row, not only the summary and failures")
    parser.add_argument("--record-to", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    networks = [n for n in (args.networks or "").split(",") if n]
    if args.record_to:
        specs = record_launches(dtypes, networks, args.batch, not args.no_benchmarks)
        Path(args.record_to).write_text(json.dumps(specs))
        return 0
    if reason := backend_missing():
        print(f"compile_audit: error: {reason}", file=sys.stderr)
        return 2
    import triton

    start = time.perf_counter()
    specs = run_recorder(dtypes, networks, args.batch, not args.no_benchmarks)
    recorded = len(specs)
    if args.kernels:
        specs = [spec for spec in specs if spec["kernel"] in args.kernels.split(",")]
    for chosen, subset in ((args.worst_cases, worst_cases), (args.quick, quick_subset), (args.ci, ci_subset)):
        specs = subset(specs) if chosen else specs
    archs = [a for a in args.archs.split(",") if a]
    print(f"compile audit: {recorded} specializations recorded as launched on {EMULATED_GPU} "
          f"({EMULATED_MULTIPROCESSORS} multiprocessors), {len(specs)} compiled for {', '.join(archs)} "
          f"(triton {triton.__version__}, {args.jobs} processes)", flush=True)
    rows = audit(specs, archs, args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.full_table:
        print(table(rows) + "\n")
    print(summary(rows))
    problems = failures(rows)
    fp32_spills = [r for r in rows if "error" not in r and r["spec"]["dtype"] == "fp32" and (r["spill_stores"] or r["spill_loads"])]
    print(f"\n{len(rows)} compiles in {time.perf_counter() - start:.0f} s; fp32 spilling: {len(fp32_spills)} (reported, "
          "not failed); failures: " + str(len(problems)))
    for problem in problems:
        print("FAIL " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
