"""The launch-configuration table (kernels.launch_configs) and the search that writes it
(bench.config_search), on the CPU: lookup, defaults, bad or stale files, and the search's
orchestration with a stand-in timer (the timing itself needs a GPU)."""

import inspect
import json
import warnings

import pytest

from preresnet.kernels import launch_configs as lc
from preresnet.kernels.launch_configs import (CONV_DGRAD, CONV_FWD, CONV_WGRAD, DEFAULTS, ELEMENTWISE, KINDS, SEARCH_SPACE,
                                    Config, LaunchConfigError)

GPU = "NVIDIA H100 80GB HBM3"
KEY = "16x32x32->16 k3 s1 +residual"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv(lc.TABLE_ENV, raising=False)
    lc.clear_cache()
    lc._names.clear()
    yield
    lc.clear_cache()


def write(tmp_path, table, name="table.json"):
    path = tmp_path / name
    path.write_text(table if isinstance(table, str) else json.dumps(table))
    return path


def test_defaults_are_in_their_search_spaces_and_name_only_block_fields():
    for kind in KINDS:
        assert DEFAULTS[kind] in SEARCH_SPACE[kind]
        assert len(set(SEARCH_SPACE[kind])) == len(SEARCH_SPACE[kind]), f"{kind}: duplicate configs"
        for config in SEARCH_SPACE[kind]:
            assert set(dict(config.blocks)) <= set(lc.BLOCK_DIMS[kind])
            assert all(v >= lc.MIN_BLOCK and v & (v - 1) == 0 for _, v in config.blocks), config
            assert config.num_warps in (1, 2, 4, 8, 16) and config.num_stages >= 1


def test_config_fields_are_constexprs_of_the_kernels_of_their_kind():
    """A table entry reaches the kernel only if its block names are the kernel's constexpr names."""
    import preresnet.kernels.preact_conv as pc

    for name, value in vars(pc).items():
        fn = getattr(value, "fn", None)
        if fn is None or type(value).__name__ not in ("JITFunction", "InterpretedFunction"):
            continue
        params = inspect.signature(fn).parameters
        if not any(p.endswith("ptr") for p in params):
            continue  # a helper, not a kernel
        kind = lc.kernel_kind(name)
        for config in SEARCH_SPACE[kind]:
            missing = set(dict(config.blocks)) - set(params)
            assert not missing or kind == ELEMENTWISE, f"{name} ({kind}) has no constexpr {missing}"


def test_block_clamps_to_the_dimension():
    config = Config.of(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    assert config.block("BLOCK_N", 16) == 16 and config.block("BLOCK_N", 3) == 16  # tl.dot needs 16
    assert config.block("BLOCK_N", 48) == 64 and config.block("BLOCK_N", 1000) == 64
    assert config.fit(CONV_FWD, {"M": 128 * 8 * 8, "C_IN": 3, "C_OUT": 32}) == {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}
    assert config.options == {"num_warps": 4, "num_stages": 2}
    assert Config.from_json(CONV_FWD, config.to_json()) == config


def test_lookup_without_a_table_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.TABLE_ENV, str(tmp_path / "absent.json"))
    for kind in KINDS:
        assert lc.launch_config(kind, KEY, "bfloat16", GPU) is DEFAULTS[kind]
        assert lc.launch_config(kind, None, "bfloat16", GPU) is DEFAULTS[kind]
    with pytest.raises(KeyError):
        lc.launch_config("conv_transpose", KEY, "bfloat16", GPU)


def test_lookup_by_gpu_dtype_layer_and_kind(tmp_path, monkeypatch):
    chosen = SEARCH_SPACE[CONV_DGRAD][1]
    path = write(tmp_path, {GPU: {"bfloat16": {KEY: {CONV_DGRAD: chosen.to_json()}}}})
    monkeypatch.setenv(lc.TABLE_ENV, str(path))
    import torch

    assert lc.launch_config(CONV_DGRAD, KEY, torch.bfloat16, GPU) == chosen
    assert lc.launch_config(CONV_FWD, KEY, torch.bfloat16, GPU) is DEFAULTS[CONV_FWD]  # kind not named
    assert lc.launch_config(CONV_DGRAD, KEY, torch.float16, GPU) is DEFAULTS[CONV_DGRAD]  # dtype not named
    assert lc.launch_config(CONV_DGRAD, "other", torch.bfloat16, GPU) is DEFAULTS[CONV_DGRAD]  # layer not named
    assert lc.launch_config(CONV_DGRAD, KEY, torch.bfloat16, "NVIDIA A100-SXM4-80GB") is DEFAULTS[CONV_DGRAD]
    assert lc.launch_config(CONV_DGRAD, KEY, torch.bfloat16, torch.device("cpu")) is DEFAULTS[CONV_DGRAD]
    with lc.emulate_device(GPU):  # the compile audit: CPU tensors looked up as the GPU
        assert lc.auditing() and lc.launch_config(CONV_DGRAD, KEY, torch.bfloat16, torch.device("cpu")) == chosen
    assert not lc.auditing()


def test_layer_key_is_the_path_tables_key():
    assert lc.layer_key(16, 32, 32, 16, 3, 1, True, True) == KEY
    assert lc.layer_key(3, 32, 32, 16, 3, 1, False, False) == "3x32x32->16 k3 s1 plain"


def test_the_committed_table_is_valid():
    lc.load_table(lc.TABLE)


BAD_TABLES = {
    "not json": "{nope",
    "not an object": "[1, 2]",
    "unknown dtype": {GPU: {"bf8": {}}},
    "unknown kind": {GPU: {"bfloat16": {KEY: {"conv_transpose": DEFAULTS[CONV_FWD].to_json()}}}},
    "unknown field": {GPU: {"bfloat16": {KEY: {CONV_FWD: {**DEFAULTS[CONV_FWD].to_json(), "BLOCK_Q": 16}}}}},
    "field of another kind": {GPU: {"bfloat16": {KEY: {CONV_FWD: DEFAULTS[CONV_DGRAD].to_json()}}}},
    "not an integer": {GPU: {"bfloat16": {KEY: {CONV_FWD: {**DEFAULTS[CONV_FWD].to_json(), "num_warps": "4"}}}}},
    "outside the search space": {GPU: {"bfloat16": {KEY: {CONV_DGRAD: Config.of(
        BLOCK_M=64, BLOCK_C=32, BLOCK_CO=64, num_warps=4, num_stages=3).to_json()}}}},
    "wrong nesting": {GPU: {"bfloat16": {KEY: DEFAULTS[CONV_FWD].to_json()}}},
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_a_bad_table_is_one_clear_error_at_load_and_the_defaults_mid_run(tmp_path, monkeypatch, name):
    path = write(tmp_path, BAD_TABLES[name])
    with pytest.raises(LaunchConfigError, match=str(path).replace(".", r"\.")):
        lc.load_table(path)
    monkeypatch.setenv(lc.TABLE_ENV, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in KINDS:  # never raises: warns once, then the defaults for the whole run
            assert lc.launch_config(kind, KEY, "bfloat16", GPU) is DEFAULTS[kind]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "using the default launch configurations" in str(caught[0].message)


def test_the_table_is_read_once_per_file(tmp_path, monkeypatch):
    chosen = SEARCH_SPACE[CONV_FWD][1]
    path = write(tmp_path, {GPU: {"bfloat16": {KEY: {CONV_FWD: chosen.to_json()}}}})
    monkeypatch.setenv(lc.TABLE_ENV, str(path))
    assert lc.launch_config(CONV_FWD, KEY, "bfloat16", GPU) == chosen
    path.write_text("{broken")  # not reread mid-run
    assert lc.launch_config(CONV_FWD, KEY, "bfloat16", GPU) == chosen
    other = write(tmp_path, {}, "other.json")
    monkeypatch.setenv(lc.TABLE_ENV, str(other))  # another file is read
    assert lc.launch_config(CONV_FWD, KEY, "bfloat16", GPU) is DEFAULTS[CONV_FWD]


# --- the search (bench.config_search), with a stand-in timer ------------------------------------------


def fake_signatures():
    from preresnet.kernels.paths import ConvSignature

    return [ConvSignature(16, 16, 3, 1, 32, 32, True, True), ConvSignature(64, 64, 3, 1, 8, 8, True, True),
            ConvSignature(16, 32, 1, 2, 32, 32, True, False)]


def test_search_keeps_the_fastest_config_per_layer_and_kind():
    """The timer reads the configs through launch_config, as the launchers do: the search must
    hand each candidate to it, and keep a candidate only when it is faster by the margin."""
    from bench import config_search as cs

    fast_dgrad = SEARCH_SPACE[CONV_DGRAD][2]  # 64 x 32 x 16, 4 warps: distinct from the default at every layer
    fast_wgrad = SEARCH_SPACE[CONV_WGRAD][2]
    seen = []

    def timer(signature):
        configs = {kind: lc.launch_config(kind, signature.key, "bfloat16", GPU) for kind in KINDS}
        seen.append(configs)
        ms = 1.0
        if configs[CONV_DGRAD] == fast_dgrad:
            ms -= 0.2
        if configs[CONV_WGRAD] == fast_wgrad and signature.in_channels == 64:
            ms -= 0.1
        if configs[CONV_FWD] != DEFAULTS[CONV_FWD]:
            ms -= 0.01  # within the margin: not worth leaving the default
        return ms

    signatures = fake_signatures()
    result = cs.search(signatures, GPU, "bfloat16", timer, lambda: 1.0, batch=128, log=lambda *_: None)
    entries = result[GPU]["bfloat16"]
    first, second = entries[signatures[0].key], entries[signatures[1].key]
    # only what differs from the defaults is kept
    assert first["configs"] == {CONV_DGRAD: fast_dgrad.to_json()}
    assert second["configs"] == {CONV_DGRAD: fast_dgrad.to_json(), CONV_WGRAD: fast_wgrad.to_json()}
    assert first["ms"] == pytest.approx(0.8) and first["default_ms"] == 1.0
    # a 16-channel layer clamps most configs to the same launch: each distinct one is timed once
    sizes = cs.layer_sizes(signatures[0], 128)
    expected = 1 + sum(len(cs.candidates(kind, sizes[kind])) - 1 for kind in cs.KINDS_SEARCHED)
    assert first["timed"] == expected < 1 + sum(len(SEARCH_SPACE[k]) - 1 for k in KINDS)
    assert len({json.dumps({k: str(v) for k, v in c.items()}) for c in seen}) > 10
    table = cs.table_from(result)  # only what differs from the defaults, valid for load_table
    assert table[GPU]["bfloat16"][signatures[0].key] == {CONV_DGRAD: fast_dgrad.to_json()}
    assert lc.validate_table(table)
    assert lc.launch_config(CONV_DGRAD, signatures[0].key, "bfloat16", GPU) is DEFAULTS[CONV_DGRAD]  # override gone


def test_search_stops_at_its_budget_and_names_what_it_skipped():
    from bench import config_search as cs

    calls = []
    left = iter([1.0] * 5 + [0.0] * 1000)

    def timer(signature):
        calls.append(signature.key)
        return 1.0

    signatures = fake_signatures()
    result = cs.search(signatures, GPU, "bfloat16", timer, lambda: next(left), skip=lambda s: "torch path"
                       if s.kernel == 1 else None, log=lambda *_: None)[GPU]["bfloat16"]
    assert result[signatures[0].key]["partial"] == "time budget" and result[signatures[0].key]["timed"] == len(calls)
    assert result[signatures[1].key] == {"skipped": "time budget"}
    assert result[signatures[2].key] == {"skipped": "torch path"}
    assert cs.table_from({GPU: {"bfloat16": result}}) == {}


def test_search_survives_a_failing_candidate_and_a_failing_layer():
    from bench import config_search as cs

    bad = SEARCH_SPACE[CONV_FWD][1]

    def timer(signature):
        if signature.in_channels == 64:
            raise RuntimeError("out of resources")
        if lc.launch_config(CONV_FWD, signature.key, "bfloat16", GPU) == bad:
            raise RuntimeError("candidate failed")
        return 1.0

    result = cs.search(fake_signatures(), GPU, "bfloat16", timer, lambda: 1.0, log=lambda *_: None)[GPU]["bfloat16"]
    first = result[fake_signatures()[0].key]
    assert "candidate failed" in first["errors"][0] and "ms" in first
    assert "out of resources" in result[fake_signatures()[1].key]["skipped"]
    assert cs.markdown_lines({GPU: {"bfloat16": result}})[1].startswith("## Launch configurations")


def test_layer_order_puts_the_costly_layers_first():
    from bench import config_search as cs

    order = cs.layer_order(["preresnet20"])
    assert len({s.key for s in order}) == len(order) >= 5
    cost = [s.height * s.width * s.in_channels * s.out_channels * s.kernel ** 2 / s.stride ** 2 for s in order]
    assert cost[0] == max(cost)


def test_render_results_installs_the_newest_search_per_gpu(tmp_path):
    from bench import render_results

    old = {"launch_configs": {GPU: {"bfloat16": {
        KEY: {"configs": {CONV_DGRAD: SEARCH_SPACE[CONV_DGRAD][1].to_json()}, "ms": 1, "default_ms": 2, "timed": 3},
        "other": {"configs": {CONV_FWD: SEARCH_SPACE[CONV_FWD][1].to_json()}, "ms": 1, "default_ms": 2, "timed": 3}}}}}
    new = {"launch_configs": {GPU: {"bfloat16": {
        KEY: {"configs": {}, "ms": 1, "default_ms": 1, "timed": 3},  # measured: the defaults are best
        "other": {"skipped": "time budget"}}}}}
    table = json.loads(render_results.launch_configs([old, new]))
    assert KEY not in table[GPU]["bfloat16"]  # the newest measurement kept the default
    assert table[GPU]["bfloat16"]["other"] == {CONV_FWD: SEARCH_SPACE[CONV_FWD][1].to_json()}  # skipped: kept
    assert lc.validate_table(table)
    assert render_results.launch_configs([]) == "{}\n"  # no report: an empty table, as committed before the first GPU


def test_the_launchers_launch_the_tables_config_for_their_layer(tmp_path, monkeypatch):
    """kernels.preact_conv looks each kernel's config up by the layer's key: a table entry for one
    layer and kind changes that launch's blocks, warps and stages, and no other."""
    import torch

    from preresnet.kernels import preact_conv

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, kwargs))

    for name in ("_bn_relu_conv_fwd_kernel", "_bn_relu_conv_dgrad_kernel", "_bn_relu_conv_wgrad_kernel",
                 "_bn_backward_apply_kernel"):
        monkeypatch.setattr(preact_conv, name, Recorder(name))
    forward, dgrad = SEARCH_SPACE[CONV_FWD][1], SEARCH_SPACE[CONV_DGRAD][2]
    assert forward != DEFAULTS[CONV_FWD] and dgrad != DEFAULTS[CONV_DGRAD]
    key = lc.layer_key(64, 8, 8, 64, 3, 1, True, True)
    monkeypatch.setenv(lc.TABLE_ENV, str(write(tmp_path, {GPU: {"bfloat16": {key: {
        CONV_FWD: forward.to_json(), CONV_DGRAD: dgrad.to_json()}}}})))
    x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    stats = torch.zeros(64), torch.ones(64)
    weight = torch.randn(64, 64, 3, 3)
    with lc.emulate_device(GPU):  # CPU tensors looked up as on the GPU, with the GPU's pixel tiles
        for residual in (x, None):  # the table names the layer with its residual only
            launches.clear()
            preact_conv.bn_relu_conv_forward(x, *stats, torch.ones(64), torch.zeros(64), weight, residual, 1, 1, 1e-5,
                                             True)
            preact_conv.bn_relu_conv_backward(x, x, *stats, torch.ones(64), torch.zeros(64), weight, 1, 1, 1e-5, True,
                                              True, residual=residual is not None)
            used = {name: kwargs for name, kwargs in launches}
            expected = {"_bn_relu_conv_fwd_kernel": forward if residual is not None else DEFAULTS[CONV_FWD],
                        "_bn_relu_conv_dgrad_kernel": dgrad if residual is not None else DEFAULTS[CONV_DGRAD],
                        "_bn_relu_conv_wgrad_kernel": DEFAULTS[CONV_WGRAD],
                        "_bn_backward_apply_kernel": DEFAULTS[ELEMENTWISE]}
            for name, config in expected.items():
                sizes = {"M": 2 * 8 * 8, "C_IN": 64, "C_OUT": 64, "C": 64}
                assert {k: used[name][k] for k in config.fit(lc.kernel_kind(name), sizes)} == \
                    config.fit(lc.kernel_kind(name), sizes), name
                assert {k: used[name][k] for k in config.options} == config.options, name
