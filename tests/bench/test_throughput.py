"""`ernie-serve bench throughput` and `bench scheduler` on the tiny checkpoint: smoke checks of the command
line. Each asserts what the run must have done (rows, requested token counts, KV pool), never how fast."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from ernie_serve.bench.throughput import WORKLOAD_VOCAB, ThroughputConfig, decode_rate, decode_read_bytes
from ernie_serve.bench.workload import mixed_workload
from ernie_serve.cli import main
from ernie_serve.core.config import EngineSettings
from ernie_serve.engine import Engine
from ernie_serve.models import read_model_config
from ernie_serve.testing.checkpoints import TOKENIZER_VOCAB


def _row(out: str, system: str) -> list[str]:
    """The table row of `system`, split into its cells after the name."""
    match = re.search(rf"^{re.escape(system)} +(.+)$", out, re.M)
    assert match, f"no row for {system!r} in:\n{out}"
    return match.group(1).split()


def test_fixed_lengths_against_transformers(bench_model: Path, tmp_path: Path, capsys) -> None:
    result = tmp_path / "t.json"
    args = ["bench", "throughput", "--model", str(bench_model), "--num-requests", "3", "--input-len", "12",
            "--output-len", "5", "--decode-repeats", "1", "--output-json", str(result)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "workload: 3 requests, prompts 12..12 tokens (36 in all), outputs 5..5 tokens (15 in all)" in out
    # requests, out tokens, start s, seconds, out tok/s, TTFT ms, TPOT ms, KV blocks
    engine_row, reference_row = _row(out, "ernie-serve (torch)"), _row(out, "transformers")
    assert engine_row[:2] == reference_row[:2] == ["3", "15"]
    assert float(engine_row[5]) > 0 and float(engine_row[6]) > 0 and int(engine_row[7]) > 0
    assert reference_row[5:] == ["-", "-", "-"]
    assert re.search(r"^ernie-serve / transformers throughput: \d+\.\d\dx$", out, re.M)
    assert re.search(r"^single-request decode \(ernie-serve \(torch\), median of 1\): \d+\.\d tok/s$", out, re.M)
    summary = json.loads(result.read_text())
    engine, reference = summary["results"]
    assert engine["output_tokens"] == reference["output_tokens"] == 15
    assert summary["ratio"] == pytest.approx(engine["tokens_per_second"] / reference["tokens_per_second"])
    assert engine["ttft_ms"]["p99"] >= engine["ttft_ms"]["median"] > 0
    assert summary["single_request_decode_tok_s"] == engine["decode_tok_s"] > 0


def test_mixed_workload_by_default(bench_model: Path, capsys) -> None:
    args = ["bench", "throughput", "--model", str(bench_model), "--num-requests", "1", "--skip-transformers",
            "--decode-repeats", "0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    requested = sum(r.output_len for r in mixed_workload(1, vocab=min(WORKLOAD_VOCAB, TOKENIZER_VOCAB)))
    assert _row(out, "ernie-serve (torch)")[:2] == ["1", str(requested)]
    assert not re.search(r"^(transformers|single-request decode) ", out, re.M)


def test_every_round_meets_the_workload_uncached(bench_model: Path, tmp_path: Path) -> None:
    """The rounds send the same prompts (and the warm-up the first one): each round starts with the prefix
    cache emptied, so the last round found none of its prompt tokens cached. The decode passes likewise."""
    result = tmp_path / "r.json"
    args = ["bench", "throughput", "--model", str(bench_model), "--num-requests", "3", "--input-len", "40",
            "--output-len", "2", "--skip-transformers", "--rounds", "2", "--decode-repeats", "2",
            "--output-json", str(result)]  # fmt: skip
    assert main(args) == 0
    (engine,) = json.loads(result.read_text())["results"]
    assert engine["cached_prompt_tokens"] == 0


def test_each_decode_pass_starts_uncached(bench_model: Path) -> None:
    """`decode_rate` sends the same prompt each pass: none of its tokens may come from the pass before."""
    with Engine(EngineSettings(model=str(bench_model))) as engine:
        assert decode_rate(engine, 2) > 0 and decode_rate(engine, 2) > 0
        assert engine.core.scheduler.stats().prefix_cache_hits == 0


def test_profile_breaks_the_step_down(bench_model: Path, tmp_path: Path, capsys) -> None:
    result = tmp_path / "p.json"
    args = ["bench", "throughput", "--model", str(bench_model), "--num-requests", "1", "--input-len", "8",
            "--output-len", "2", "--skip-transformers", "--decode-repeats", "0", "--profile",
            "--output-json", str(result)]  # fmt: skip
    assert main(args) == 0
    assert "where the time goes, single-request decode" in capsys.readouterr().out
    summary = json.loads(result.read_text())
    for key in ("profile", "decode_profile"):
        phases = {k: v for k, v in summary[key].items() if k.startswith("engine: ")}
        steps = {f"engine: {p}" for p in ("schedule", "backend.execute", "sample", "update")}
        assert set(phases) == steps | {"engine: detokenize, outputs, rest"}
        assert all(0 <= v <= 1 for v in phases.values()) and sum(phases.values()) == pytest.approx(1, abs=0.01)
        assert summary[key]["torch ops: matmul"] > 0


def test_two_backends_in_one_run(bench_model: Path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx backend needs pip install 'ernie-serve[onnx]'")
    args = ["bench", "throughput", "--model", str(bench_model), "--backend", "onnx,torch", "--num-requests", "2",
            "--input-len", "8", "--output-len", "3", "--skip-transformers", "--decode-repeats", "0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _row(out, "ernie-serve (onnx)")[:2] == _row(out, "ernie-serve (torch)")[:2] == ["2", "6"]
    assert re.search(r"^onnx / torch throughput: \d+\.\d\dx$", out, re.M)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--backend", "nope"], 1, "unknown backend 'nope'"),
        (["--input-len", "8"], 2, "--input-len and --output-len go together"),
        (["--max-num-seqs", "0"], 2, "--max-num-seqs: Input should be greater than or equal to 1"),
        (["--backend", "torch,torch"], 2, "--backend must name distinct backends"),
    ],
)
def test_bad_flags_are_one_line(bench_model: Path, capsys, extra: list[str], code: int, message: str) -> None:
    args = ["bench", "throughput", "--model", str(bench_model), "--skip-transformers", "--decode-repeats", "0"]
    assert main([*args, "--num-requests", "1", *extra]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_transformers_needs_real_weights() -> None:
    with pytest.raises(ValueError, match="--load-format dummy add --skip-transformers"):
        ThroughputConfig(model="ernie-4.5-0.3b", engine_settings={"load_format": "dummy"})
    with pytest.raises(ValueError, match="needs a checkpoint directory"):
        ThroughputConfig(model="ernie-4.5-0.3b")
    ThroughputConfig(model="ernie-4.5-0.3b", compare_transformers=False, engine_settings={"load_format": "dummy"})


def test_bench_scheduler_prints_a_row_per_size(capsys) -> None:
    assert main(["bench", "scheduler"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["running", "us/step", "us/request"]
    rows = [line.split() for line in out[1:]]
    assert [row[0] for row in rows] == ["1", "8", "32", "128", "512"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)


def test_quantization_systems_side_by_side(bench_model: Path, capsys) -> None:
    args = ["bench", "throughput", "--model", str(bench_model), "--num-requests", "2", "--input-len", "8",
            "--output-len", "3", "--skip-transformers", "--decode-repeats", "1",
            "--quantization", "none,wint8"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _row(out, "ernie-serve (torch)")[:2] == _row(out, "ernie-serve (torch wint8)")[:2] == ["2", "6"]
    assert re.search(r"^torch wint8 / torch: throughput \d+\.\d\dx, single-request decode \d+\.\d\dx$", out, re.M)


def test_bandwidth_bound_reports_the_bytes_a_step_reads_and_the_fraction(bench_model: Path, tmp_path: Path, capsys):
    result = tmp_path / "b.json"
    args = ["bench", "throughput", "--model", str(bench_model), "--num-requests", "1", "--input-len", "8",
            "--output-len", "2", "--skip-transformers", "--decode-repeats", "2", "--quantization", "none,wint4",
            "--bandwidth-bound", "--output-json", str(result)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    config = read_model_config(bench_model)
    for system, quantization in (("torch", None), ("torch wint4", "wint4")):
        engine = next(r for r in json.loads(result.read_text())["results"] if r["system"] == f"ernie-serve ({system})")
        assert engine["decode_read_bytes"] == decode_read_bytes(config, quantization, 128, True)
        assert engine["read_bandwidth"] > 0 and engine["bound_fraction"] > 0
        line = re.search(
            rf"^single-request decode \(ernie-serve \({system}\), median of 2\): .*\n  (\d+\.\d+) GB of weights read "
            r"per token; read bandwidth beside it (\d+\.\d) GB/s \(median\); (\d+)% of the bound$",
            out,
            re.M,
        )
        assert line and float(line.group(1)) == pytest.approx(engine["decode_read_bytes"] / 1e9, abs=1e-3)


@pytest.mark.parametrize("shape", ["moe_shared_tied", "moe_interval2_untied_mqa", "dense_bias_headdim"])
def test_decode_read_bytes_counts_what_one_token_touches(tiny_checkpoint, shape: str) -> None:
    """Float32: every parameter's 4 bytes but the embedding (one row) and the routed experts (k of E per layer);
    quantized: the same products as stored codes and scales. Counted here from the model's own tensors."""
    import torch

    from ernie_serve.backends.torch.model import ErnieForCausalLM
    from ernie_serve.quantization import QuantSpec, is_quantized_tensor, storage_bytes

    config = read_model_config(tiny_checkpoint(shape))
    targets = dict(ErnieForCausalLM(config, torch.float32, torch.device("meta")).checkpoint_targets())
    spec = QuantSpec.of("wint4", 32)
    expected = {"float32": Fraction(0), "wint4": Fraction(0)}
    for name, tensor in targets.items():
        share = Fraction(1)
        if ".mlp.experts." in name:
            share = Fraction(config.moe_k, config.moe_num_experts)  # k of the E experts' matrices are read
        if name == "model.embed_tokens.weight":
            expected["float32"] += 4 * config.hidden_size
            expected["wint4"] += 4 * config.hidden_size
            if config.tie_word_embeddings:  # the tied head reads it whole (quantized: its quantized copy)
                expected["float32"] += 4 * tensor.numel()
                expected["wint4"] += storage_bytes(*tensor.shape, spec)
            continue
        quantized = (is_quantized_tensor(name) or name == "lm_head.weight") and tensor.dim() == 2
        expected["float32"] += share * 4 * tensor.numel()
        expected["wint4"] += share * (storage_bytes(*tensor.shape, spec) if quantized else 4 * tensor.numel())
    assert decode_read_bytes(config, None, None, True) == expected["float32"]
    assert decode_read_bytes(config, "wint4", 32, True) == expected["wint4"]
