"""The speed benchmark's plumbing on a tiny model and grid: reports written and well-formed, cache sizes, goal
checks, peak-memory measurement and graceful handling of a failing compiler. No speed is asserted."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import tiny_config

from atlas_mag import AtlasMAGCache, AtlasMAGConfig, AtlasMAGForCausalLM
from atlas_mag.benchmark import (
    ATLAS_COMPILED,
    ATLAS_NO_CACHE,
    ATLAS_TTL_OFF,
    ATLAS_TTL_ON,
    LLAMA,
    BenchmarkGrid,
    PeakMemory,
    Variant,
    build_variants,
    cache_nbytes,
    evaluate_goals,
    llama_config_for,
    measure_decode_run,
    profile_atlas,
    render_markdown,
    run_benchmark,
    write_report,
)
from atlas_mag.benchmark.flops import row_flops_per_token
from atlas_mag.benchmark.kernels import newton_schulz_shapes
from atlas_mag.ops_atlas import newton_schulz_choice

REPO = Path(__file__).resolve().parents[1]

TINY_GRID = BenchmarkGrid(
    train_lengths=(8, 16),
    prefill_lengths=(8, 16),
    decode_contexts=(16, 32),
    decode_tokens=4,
    repeats=1,
    warmup=1,
    batch_size=2,
    goal_short=8,
    goal_long=16,
    goal_decode_near=16,
    goal_decode_far=32,
    goal_decode_vs_llama_from=16,
    compile_lengths=(8, 16),
    no_cache_decode_tokens=2,
)


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this compiler always fails")


@pytest.fixture(scope="module")
def benchmark_results():
    torch.manual_seed(0)
    return run_benchmark(tiny_config(), TINY_GRID, "cpu", compile_backend=failing_backend, progress=False)


def test_every_cell_is_measured_and_a_failing_compiler_is_recorded(benchmark_results):
    results = benchmark_results
    for section, lengths in (("train", (8, 16)), ("prefill", (8, 16))):
        for variant in (ATLAS_TTL_ON, ATLAS_TTL_OFF, LLAMA):
            for length in lengths:
                (row,) = [r for r in results[section] if r["variant"] == variant and r["length"] == length]
                assert "error" not in row, row
                assert row["tokens_per_s"] == pytest.approx(TINY_GRID.batch_size * length / row["seconds"])
                assert row["tokens_per_s"] > 0
    assert not [r for r in results["train"] if r["variant"] == ATLAS_COMPILED]
    compiled = [r for r in results["prefill"] + results["decode"] if r["variant"] == ATLAS_COMPILED]
    assert len(compiled) == 3  # prefill 8 and 16, decode 16 (the only context in compile_lengths)
    assert "this compiler always fails" in compiled[0]["error"]
    assert all(r["error"].startswith("skipped: compilation failed earlier") for r in compiled[1:])
    assert results["compile"]["backend"] == "failing_backend"
    for row in results["decode"]:
        if row["variant"] != ATLAS_COMPILED:
            assert row["ms_per_token_median"] <= row["ms_per_token_max"]
            assert 0 < row["ms_per_token"] <= row["ms_per_token_max"]


def test_no_cache_baseline_recomputes_the_whole_sequence_every_step(benchmark_results):
    config = tiny_config()
    model = AtlasMAGForCausalLM(config).eval()
    calls = []

    def recording_forward(input_ids, **kwargs):
        calls.append((input_ids.clone(), kwargs))
        return model(input_ids=input_ids, **kwargs)

    variant = Variant("no cache", model, recording_forward, {"ttl": False}, recompute_prefix=True)
    run = measure_decode_run(variant, 16, TINY_GRID, torch.device("cpu"))
    steps = TINY_GRID.warmup + TINY_GRID.no_cache_decode_tokens
    assert [ids.shape for ids, _ in calls] == [(TINY_GRID.batch_size, 16 + i) for i in range(1, steps + 1)]
    for (shorter, _), (longer, _) in zip(calls, calls[1:], strict=False):
        assert torch.equal(longer[:, :-1], shorter)  # each step extends the sequence it recomputed before
    assert all(kwargs == {"use_cache": False, "logits_to_keep": 1, "ttl": False} for _, kwargs in calls)
    assert len(run["step_seconds"]) == TINY_GRID.no_cache_decode_tokens
    assert run["cache_bytes"] is None

    rows = [r for r in benchmark_results["decode"] if r["variant"] == ATLAS_NO_CACHE]
    assert [r["context"] for r in rows] == [16, 32] and all(r["cache_bytes"] is None for r in rows)
    assert not [r for r in benchmark_results["train"] + benchmark_results["prefill"] if r["variant"] == ATLAS_NO_CACHE]
    markdown = render_markdown(benchmark_results)
    assert "Cached decoding with TTL on is faster per token than no-cache decoding: " in markdown
    cache_table = markdown.split("Cache after the context, KiB:")[1].split("Peak memory")[0]
    assert "no cache" not in cache_table and "Atlas TTL on" in cache_table


def test_cache_bytes(benchmark_results):
    config = tiny_config()
    decode = benchmark_results["decode"]
    # The Llama's DynamicCache: keys and values of every layer, every head and every position, in fp32.
    per_position = 2 * config.num_hidden_layers * config.hidden_size * 4 * TINY_GRID.batch_size
    steps = TINY_GRID.warmup + TINY_GRID.decode_tokens
    for context in (16, 32):
        (llama,) = [r for r in decode if r["variant"] == LLAMA and r["context"] == context]
        assert llama["cache_bytes"] == per_position * context
        assert llama["cache_bytes_after_decode"] == per_position * (context + steps)
    for variant in (ATLAS_TTL_ON, ATLAS_TTL_OFF):
        sizes = {r["cache_bytes"] for r in decode if r["variant"] == variant}
        sizes |= {r["cache_bytes_after_decode"] for r in decode if r["variant"] == variant}
        assert len(sizes) == 1, f"{variant} cache grows with the context: {sizes}"

    model = AtlasMAGForCausalLM(config).eval()
    with torch.no_grad():
        cache = model(torch.randint(4, config.vocab_size, (2, 20)), use_cache=True).cache
    assert isinstance(cache, AtlasMAGCache)
    assert cache_nbytes(cache) == cache.nbytes() > 0


def test_reports_are_written_and_well_formed(benchmark_results, tmp_path):
    paths = write_report(benchmark_results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "benchmark_speed.json",
        "benchmark_speed.md",
        "benchmark_speed.png",
    ]
    loaded = json.loads(paths["json"].read_text(), parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    assert loaded == json.loads(json.dumps(benchmark_results))
    assert loaded["meta"]["grid"]["train_lengths"] == [8, 16]

    markdown = paths["md"].read_text()
    assert markdown == render_markdown(benchmark_results)
    for heading in ("## Training step", "## Prefill", "## Decode", "## torch.compile", "## Goals"):
        assert heading in markdown
    llama_prefill_16 = next(r for r in loaded["prefill"] if r["variant"] == LLAMA and r["length"] == 16)
    atlas_prefill_16 = next(r for r in loaded["prefill"] if r["variant"] == ATLAS_TTL_ON and r["length"] == 16)
    ratio = atlas_prefill_16["tokens_per_s"] / llama_prefill_16["tokens_per_s"]
    assert f"{atlas_prefill_16['tokens_per_s']:,.0f} ({ratio:.2f}x)" in markdown
    goal_rows = [line for line in markdown.split("## Goals")[1].splitlines() if line.startswith("| ")]
    assert len(goal_rows) == len(loaded["goals"]) + 1  # and the header
    assert "this compiler always fails" in markdown

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(paths["png"])
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]


def test_every_row_has_its_flops_and_their_fraction_of_the_measured_matmul_rate(benchmark_results):
    results = benchmark_results
    meta = results["meta"]
    assert meta["matmul_flops_per_s"] == max(meta["matmul_probes_flops_per_s"]) > 0
    variants = build_variants(tiny_config(), TINY_GRID.max_length, torch.device("cpu"), torch.float32, None)
    measured = 0
    for section in ("train", "prefill", "decode"):
        for row in results[section]:
            if "error" in row:
                assert "flops_per_token" not in row
                continue
            length = row["context" if section == "decode" else "length"]
            expected = row_flops_per_token(section, variants[row["variant"]], length, TINY_GRID)
            assert row["flops_per_token"] == expected.as_dict()
            tokens_per_s = 1000 / row["ms_per_token"] if section == "decode" else row["tokens_per_s"]
            assert row["flops_per_s"] == pytest.approx(expected.total * tokens_per_s)
            assert row["matmul_rate_fraction"] == pytest.approx(row["flops_per_s"] / meta["matmul_flops_per_s"])
            measured += 1
    assert measured >= 20
    ttl_on = next(r for r in results["prefill"] if r["variant"] == ATLAS_TTL_ON and r["length"] == 16)
    assert ttl_on["flops_per_token"]["newton_schulz"] > 0 and ttl_on["flops_per_token"]["memory_gradients"] > 0
    ttl_off = next(r for r in results["prefill"] if r["variant"] == ATLAS_TTL_OFF and r["length"] == 16)
    assert ttl_off["flops_per_token"]["newton_schulz"] == 0 < ttl_off["flops_per_token"]["memory_reads"]

    shapes = [row["shape"] for row in results["newton_schulz"]]
    assert shapes == [list(shape) for shape in newton_schulz_shapes(tiny_config(), TINY_GRID.batch_size)]
    for row in results["newton_schulz"]:
        assert row["chosen"] == newton_schulz_choice(row["shape"][1], row["shape"][2], 5)
        assert row["direct_ms"] > 0 and row["gram_ms"] > 0
        assert row["direct_error"] < 1e-4 and row["gram_error"] < 1e-3
    markdown = render_markdown(results)
    assert "## Analytic FLOPs, MFLOP per token" in markdown and "## Newton–Schulz per call" in markdown
    assert f"{ttl_on['matmul_rate_fraction']:.2f} |" in markdown


def test_the_newton_schulz_calls_of_the_published_model():
    """One call per smaller-Gram-side shape: proj_down and proj_up^T share theirs."""
    config = AtlasMAGConfig()
    assert newton_schulz_shapes(config, 3) == [(3, 512, 2144), (3, 256, 512), (6, 64, 512), (3, 64, 256)]


def test_goals_are_judged_from_the_numbers():
    grid = TINY_GRID
    results = {"train": [], "prefill": [], "decode": []}
    speeds = {
        ATLAS_TTL_ON: {8: 60.0, 16: 120.0},
        ATLAS_TTL_OFF: {8: 80.0, 16: 90.0},
        LLAMA: {8: 100.0, 16: 100.0},
    }
    memory = {ATLAS_TTL_ON: {8: 1000, 16: 2000}, ATLAS_TTL_OFF: {8: 1000, 16: 4000}, LLAMA: {8: 1, 16: 1}}
    for section in ("train", "prefill"):
        for variant, by_length in speeds.items():
            for length, speed in by_length.items():
                results[section].append(
                    {
                        "variant": variant,
                        "length": length,
                        "tokens_per_s": speed,
                        "peak_memory_bytes": memory[variant][length],
                        "matmul_rate_fraction": speed / 100,
                    }
                )
    decode = {ATLAS_TTL_ON: {16: (2.0, 500), 32: (2.2, 500)}, ATLAS_TTL_OFF: {16: (1.0, 400), 32: (3.0, 800)}}
    decode[LLAMA] = {16: (1.5, 100), 32: (3.0, 200)}
    for variant, by_context in decode.items():
        for context, (ms, size) in by_context.items():
            results["decode"].append({"variant": variant, "context": context, "ms_per_token": ms, "cache_bytes": size})
    results["newton_schulz"] = [{"shape": [1, 512, 2144], "speedup": 1.6}, {"shape": [1, 64, 512], "speedup": 1.0}]
    goals = {g["goal"]: (g["value"], g["status"]) for g in evaluate_goals(results, grid)}
    assert len(goals) == 19

    def check(prefix: str, value: float, status: str) -> None:
        (key,) = [k for k in goals if k.startswith(prefix)]
        assert goals[key][0] == pytest.approx(value) and goals[key][1] == status, (key, goals[key])

    check("Atlas TTL on: decode ms/token at 32 over at 16", 1.1, "met")
    check("Atlas TTL off: decode ms/token at 32 over at 16", 3.0, "missed")
    check("Atlas TTL on: decode ms/token over Llama's", 2.0 / 1.5, "missed")
    check("Atlas TTL off: decode ms/token over Llama's", 1.0, "missed")
    check("Atlas TTL on: cache bytes", 1.0, "met")
    check("Atlas TTL off: cache bytes", 2.0, "missed")
    for section in ("training", "prefill"):
        check(f"Atlas TTL on: {section} tokens/s over Llama's at 8", 0.6, "met")
        check(f"Atlas TTL on: {section} tokens/s over Llama's at 16", 1.2, "met")
        check(f"Atlas TTL off: {section} tokens/s over Llama's at 8", 0.8, "missed")
        check(f"Atlas TTL on: peak {section} memory", 1.0, "met")
        check(f"Atlas TTL off: peak {section} memory", 2.0, "missed")
    check("Atlas TTL on: prefill FLOP/s over the measured matmul rate at 8", 0.6, "missed")
    check("Atlas TTL on: prefill FLOP/s over the measured matmul rate at 16", 1.2, "met")
    check("Newton–Schulz at [512, 2144]: direct ms over", 1.6, "met")

    results["decode"] = [r for r in results["decode"] if r["variant"] != LLAMA]
    goals = {g["goal"]: g["status"] for g in evaluate_goals(results, grid)}
    assert [status for goal, status in goals.items() if "over Llama's at every context" in goal] == [
        "not measured",
        "not measured",
    ]


def test_llama_matches_the_atlas_sizes():
    config = tiny_config()
    llama = llama_config_for(config, 64)
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        assert getattr(llama, name) == getattr(config, name)
    assert llama.num_key_value_heads == config.num_attention_heads
    assert llama.max_position_embeddings == 64
    assert llama.tie_word_embeddings


def test_peak_memory_sees_an_allocation_on_cpu():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(16 * 2**20)  # 64 MiB, every page written
    assert peak.peak_bytes >= 0.9 * block.numel() * block.element_size()


def test_bad_grid_is_refused():
    bad = BenchmarkGrid(**{**TINY_GRID.__dict__, "prefill_lengths": (8, 0)})
    with pytest.raises(ValueError, match="prefill_lengths"):
        run_benchmark(tiny_config(), bad, "cpu", compile_backend=None, progress=False)


def test_profile_names_the_model_functions():
    text = profile_atlas(tiny_config(), prefill_length=16, decode_tokens=3, top=40)
    assert "prefill of 16 tokens, TTL on, sorted by cumulative" in text
    assert "3 decode steps, TTL on, sorted by tottime" in text
    assert "read_and_learn" in text and "memory_forward" in text


def test_script_quick_run_with_tiny_lengths(tmp_path):
    command = [
        sys.executable,
        "scripts/benchmark_speed.py",
        "--quick",
        "--compile-backend=eager",
        "--compile-scope=blocks",
        "--compile-lengths=32",
        "--compile-mode=reduce-overhead",
        "--train-lengths=16",
        "--prefill-lengths=16,32",
        "--decode-contexts=32",
        "--decode-tokens=2",
        "--repeats=1",
        f"--output-dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## Goals" in done.stdout
    results = json.loads((tmp_path / "benchmark_speed.json").read_text())
    assert [r["length"] for r in results["prefill"] if r["variant"] == LLAMA] == [16, 32]
    compiled = [r for r in results["prefill"] + results["decode"] if r["variant"] == ATLAS_COMPILED]
    assert [(r.get("length"), r.get("context")) for r in compiled] == [(32, None), (None, 32)]
    assert all("error" not in r for r in compiled), compiled
    assert results["meta"]["compile_mode"] == "reduce-overhead"
    assert "scope: blocks, mode: reduce-overhead" in done.stdout
    assert results["meta"]["atlas_config"]["hidden_size"] == 128
    assert (tmp_path / "benchmark_speed.png").stat().st_size > 0


def test_script_refuses_bad_lengths():
    spec = importlib.util.spec_from_file_location("benchmark_speed", REPO / "scripts" / "benchmark_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.lengths("128,256") == (128, 256)
    for bad in ("16,-4", "16,x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="lengths|integers"):
            script.lengths(bad)


@pytest.mark.parametrize("scope", ["chunks", "blocks"])
def test_regional_compilation_compiles_each_block_of_a_copy(scope):
    config = tiny_config()
    variants = build_variants(config, 64, torch.device("cpu"), torch.float32, "eager", compile_scope=scope)
    compiled, eager = variants[ATLAS_COMPILED], variants[ATLAS_TTL_ON]
    assert compiled.model is not eager.model
    assert all(block._compiled_call_impl is not None for block in compiled.model.model.layers)
    assert compiled.model.model.runs_by_chunk == (scope == "chunks") and not eager.model.model.runs_by_chunk
    ids = torch.randint(4, config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="compile_scope"):
        build_variants(config, 64, torch.device("cpu"), torch.float32, "eager", compile_scope="layers")


def test_compiled_by_chunk_row_compiles_only_at_its_first_prefill_length():
    """The compiled row (scope chunks) at three prefill lengths: the first (6 TTL chunks, enough to fill the
    windows) compiles, the next two compile no graph; the report gives each length's compile cost."""
    torch.manual_seed(0)
    grid = BenchmarkGrid(
        train_lengths=(8,),
        prefill_lengths=(24, 32, 44),
        decode_contexts=(24,),
        decode_tokens=4,
        repeats=1,
        warmup=1,
        batch_size=1,
        goal_short=24,
        goal_long=44,
        goal_decode_near=24,
        goal_decode_far=24,
        goal_decode_vs_llama_from=24,
        compile_lengths=(24, 32, 44),
    )
    results = run_benchmark(tiny_config(), grid, "cpu", compile_backend="eager", progress=False)
    compiled = [row for row in results["prefill"] if row["variant"] == ATLAS_COMPILED]
    assert [row["length"] for row in compiled] == [24, 32, 44]
    assert compiled[0]["graphs_compiled"] > 0
    assert [row["graphs_compiled"] for row in compiled[1:]] == [0, 0]
    assert results["meta"]["compile_scope"] == "chunks"
    assert "32 tokens: " in render_markdown(results) and "(new graphs: 0)" in render_markdown(results)
