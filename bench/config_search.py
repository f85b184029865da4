"""Launch configurations per layer, measured on a GPU: the table preresnet/kernels/launch_configs.json.

    python -m bench.config_search --out DIR [--budget-seconds 300] [--dtype bfloat16]

For every distinct fused layer of the paper networks (kernels.paths.ConvSignature; the layers that
cost most first, skipping those that preresnet/kernels/conv_paths.json moves to PyTorch's ops), and for each
kernel kind in turn (conv forward, data gradient, weight gradient, elementwise), every config of
the kind's search space (kernels.launch_configs.SEARCH_SPACE; configs that clamp to the same blocks
at this layer's dimensions are timed once) is timed on forward + backward of the fused layer with
the others at their best so far (coordinate descent: the sum, not the product, of the spaces). A
candidate replaces the default only when it is at least MARGIN faster. Every config in the space
passed the compile audit (no spills in bf16/fp16 on sm_90 and sm_80), so none is compiled here to
be thrown away. The GPU report runs this once per GPU as one budgeted part; `bench.render_results`
installs the result as preresnet/kernels/launch_configs.json. Training only reads the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.workloads import MODELS, conv_path_step, time_step
from preresnet import get_model
from preresnet.kernels.paths import conv_signatures, load_table
from preresnet.kernels.launch_configs import (CONV_DGRAD, CONV_FWD, CONV_WGRAD, DEFAULTS, ELEMENTWISE, SEARCH_SPACE, Config,
                                    dtype_name, override, table_json)

KINDS_SEARCHED = (CONV_FWD, CONV_DGRAD, CONV_WGRAD, ELEMENTWISE)
MARGIN = 0.97  # a candidate must beat the default by 3% (timing noise) to be kept


def layer_sizes(signature, batch: int) -> dict[str, dict[str, int]]:
    """The dimensions each kernel kind tiles, for one layer (as the launchers compute them)."""
    pad = signature.kernel // 2
    ho = (signature.height + 2 * pad - signature.kernel) // signature.stride + 1
    wo = (signature.width + 2 * pad - signature.kernel) // signature.stride + 1
    c_in, c_out = signature.in_channels, signature.out_channels
    m_in, m_out = batch * signature.height * signature.width, batch * ho * wo
    return {CONV_FWD: {"M": m_out, "C_IN": c_in, "C_OUT": c_out},
            CONV_DGRAD: {"M": m_in, "C_IN": c_in, "C_OUT": c_out},
            CONV_WGRAD: {"M": m_out, "C_IN": c_in, "C_OUT": c_out},
            ELEMENTWISE: {"M": m_in, "C": c_in}}


def candidates(kind: str, sizes: dict[str, int]) -> list[Config]:
    """The kind's search space with configs that clamp to the same launch at these sizes merged
    (the first, the default where it is among them, stands for them)."""
    seen, kept = set(), []
    for config in SEARCH_SPACE[kind]:
        effective = (tuple(sorted(config.fit(kind, sizes).items())), config.num_warps, config.num_stages)
        if effective not in seen:
            seen.add(effective)
            kept.append(config)
    return kept


def layer_order(models=None) -> list:
    """The distinct fused layers of the paper networks, the ones that cost most first
    (multiply-adds per image x how often the layer occurs in the networks)."""

    weight: dict[str, float] = {}
    found = {}
    for name in models or MODELS:
        for signature in conv_signatures(get_model(name, fused=True)).values():
            sizes = layer_sizes(signature, 1)[CONV_FWD]
            macs = sizes["M"] * signature.in_channels * signature.out_channels * signature.kernel ** 2
            weight[signature.key] = weight.get(signature.key, 0.0) + macs
            found.setdefault(signature.key, signature)
    return sorted(found.values(), key=lambda s: -weight[s.key])


def search(signatures, gpu: str, dtype, time_layer, time_left, batch: int = 128, skip=None, kinds=KINDS_SEARCHED,
           log=print) -> dict:
    """{signature key: {"configs": {kind: config json, the kinds whose best is not the default},
    "ms": best, "default_ms": ..., "timed": n}} for
    every layer searched, {"skipped": reason} for the others. time_layer(signature) -> milliseconds
    of forward + backward with the active table (an exception: that candidate is dropped);
    time_left() -> seconds left for this search; skip(signature) -> a reason to leave it out, or None."""
    dtype = dtype_name(dtype)
    entries: dict = {}
    for signature in signatures:
        key = signature.key
        reason = skip(signature) if skip else None
        if reason:
            entries[key] = {"skipped": reason}
            continue
        if time_left() <= 0:
            entries[key] = {"skipped": "time budget"}
            continue
        sizes = layer_sizes(signature, batch)
        best = {kind: DEFAULTS[kind] for kind in kinds}

        def timed(configs):
            with override({gpu: {dtype: {key: dict(configs)}}}):
                return time_layer(signature)

        try:
            default_ms = best_ms = timed(best)
        except Exception as exc:  # the defaults failing is the correctness check's business: keep them
            entries[key] = {"skipped": f"default configs failed: {exc!r}"[:300]}
            continue
        count, out_of_time, errors = 1, False, []
        for kind in kinds:
            for config in candidates(kind, sizes[kind]):
                if config == best[kind]:
                    continue
                if time_left() <= 0:
                    out_of_time = True
                    break
                trial = {**best, kind: config}
                try:
                    ms = timed(trial)
                except Exception as exc:
                    errors.append(f"{kind} {config}: {exc!r}"[:200])
                    continue
                count += 1
                if ms < MARGIN * best_ms:
                    best, best_ms = trial, ms
        entry = {"configs": {kind: config.to_json() for kind, config in best.items() if config != DEFAULTS[kind]}, "ms": best_ms,
                 "default_ms": default_ms, "timed": count, "batch": batch}
        if out_of_time:
            entry["partial"] = "time budget"  # measured candidates only; the rest kept at their defaults
        if errors:
            entry["errors"] = errors
        entries[key] = entry
        log(f"launch configs {key:38s} {default_ms:.3f} -> {best_ms:.3f} ms after {count} timings "
            + " ".join(f"{kind}[{config}]" for kind, config in best.items() if config != DEFAULTS[kind]))
    return {gpu: {dtype: entries}}


def table_from(result: dict) -> dict:
    """The launch-config table (kernels.launch_configs format) of a search result: only the kinds
    whose measured best is not the default (so a later change of a default reaches every layer the
    search did not prove otherwise)."""
    table: dict = {}
    for gpu, dtypes in result.items():
        for dtype, entries in dtypes.items():
            for key, entry in entries.items():
                chosen = entry.get("configs")
                if chosen:
                    table.setdefault(gpu, {}).setdefault(dtype, {})[key] = chosen
    return table


def gpu_timer(batch: int, dtype, iterations: int = 10, warmup: int = 2):
    """time_layer for a CUDA GPU: median ms of forward + backward of the fused layer, CUDA events."""

    def time_layer(signature) -> float:  # the warm-up compiles the candidate's kernels
        return time_step(conv_path_step(signature, "triton", "cuda", batch, dtype), warmup, iterations)

    return time_layer


def torch_path_skip(gpu: str, dtype):
    """skip(signature) for layers that preresnet/kernels/conv_paths.json runs on PyTorch's ops on this GPU."""

    entries = load_table().get(gpu, {}).get(dtype_name(dtype), {})
    return lambda signature: ("runs on PyTorch's ops (conv_paths.json)"
                              if entries.get(signature.key, {}).get("path") == "torch" else None)


def run_on_gpu(seconds: float, batch: int = 128, dtype=None, log=print) -> dict:
    """The search on this process's CUDA GPU within `seconds`."""
    import torch

    dtype = dtype or torch.bfloat16
    gpu = torch.cuda.get_device_name()
    deadline = time.perf_counter() + seconds
    return search(layer_order(), gpu, dtype, gpu_timer(batch, dtype), lambda: deadline - time.perf_counter(), batch,
                  skip=torch_path_skip(gpu, dtype), log=log)


def markdown_lines(result: dict) -> list[str]:
    lines = []
    for gpu, dtypes in result.items():
        for dtype, entries in dtypes.items():
            lines += ["", f"## Launch configurations ({gpu}, {dtype}, forward + backward, ms)", "",
                      "| layer | default | best | timings | configs other than the default |", "| --- | --- | --- | --- | --- |"]
            for key, entry in entries.items():
                if "ms" in entry:
                    changed = "; ".join(f"{kind}: {Config.from_json(kind, c)}" for kind, c in entry["configs"].items()) or "-"
                    lines.append(f"| {key} | {entry['default_ms']:.3f} | {entry['ms']:.3f} | {entry['timed']}"
                                 f"{' (partial)' if entry.get('partial') else ''} | {changed} |")
                else:
                    lines.append(f"| {key} | {entry.get('skipped')} | | | |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for launch_configs.json and launch_config_search.json")
    parser.add_argument("--budget-seconds", type=float, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    import os

    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("config_search: error: needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)", file=sys.stderr)
        return 2
    result = run_on_gpu(args.budget_seconds, args.batch_size, getattr(torch, args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_config_search.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "launch_configs.json").write_text(table_json(table_from(result)))
    print(f"wrote {out / 'launch_configs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
