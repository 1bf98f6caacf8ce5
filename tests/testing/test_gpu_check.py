"""`python -m ernie_serve.testing.gpu_check`: one line and exit 0 without a GPU, its flags, its table, and its
GPU path rehearsed on the CPU with the tiny checkpoint (`--device cpu`), since CI has no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernie_serve.bench.quantization import tiny_models
from ernie_serve.testing import gpu_check
from ernie_serve.testing.gpu_check import FULL_WORKLOAD, NO_GPU_LINE, SMALL_WORKLOAD, CheckRow, build_parser


def test_without_a_gpu_it_prints_one_line_and_exits_0(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    captured = capsys.readouterr()
    assert captured.out == NO_GPU_LINE + "\n"
    assert captured.err == ""


def test_the_module_runs_as_a_script_without_a_gpu() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    proc = subprocess.run(
        [sys.executable, "-m", "ernie_serve.testing.gpu_check", "--small"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [NO_GPU_LINE]


def test_workload_flags() -> None:
    parser = build_parser()
    assert gpu_check.workload_size(parser.parse_args([])) == FULL_WORKLOAD == (16, 8000, 1000)
    assert gpu_check.workload_size(parser.parse_args(["--small"])) == SMALL_WORKLOAD
    assert gpu_check.workload_size(parser.parse_args(["--small", "--output-len", "7"])) == (4, 1000, 7)
    args = parser.parse_args(["--model", "ernie-4.5-0.3b", "--dtype", "float32", "--skip-conformance"])
    assert (args.model, args.dtype, args.skip_conformance, args.skip_throughput) == (
        "ernie-4.5-0.3b",
        "float32",
        True,
        False,
    )
    defaults = parser.parse_args([])
    assert (defaults.model, defaults.dtype, defaults.device, defaults.backend) == (
        "ernie-4.5-21b-a3b",
        "bfloat16",
        "cuda",
        "torch",
    )


@pytest.mark.parametrize("argv", [["--num-prompts", "many"], ["--device", "gpu0"], ["--log-level", "loud"]])
def test_bad_flags_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_table_has_a_row_per_check_and_lists_failures() -> None:
    rows = [
        CheckRow("conformance torch float32", True, "8/8 passed, 3 s"),
        CheckRow("conformance torch bfloat16", False, "7/8 passed, 3 s", failures=["abort: leaked 2 blocks"]),
        CheckRow("throughput x bfloat16", True, "16 x 8000 in / 1000 out", 1234.5, 321.0, 12.345, 9000),
    ]
    lines = gpu_check.format_table(rows).splitlines()
    assert lines[0].split() == ["check", "result", "out", "tok/s", "TTFT", "ms", "TPOT", "ms", "KV", "blocks"]
    assert lines[1].split()[-4:] == ["-", "-", "-", "-"]
    assert lines[3].split()[-4:] == ["1234.5", "321.0", "12.35", "9000"]
    assert lines[4] == "FAILED conformance torch bfloat16: abort: leaked 2 blocks"
    assert len(lines) == 5


def test_the_gpu_path_rehearsed_on_the_cpu(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    """Everything the GPU run does after its device check, on the CPU with a tiny model and workload."""
    model = tiny_checkpoint("moe_shared_tied")
    out_json = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--model", str(model), "--dtype", "float32", "--num-prompts", "2",
            "--input-len", "8", "--output-len", "3", "--skip-conformance", "--output-json", str(out_json)]  # fmt: skip
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    assert f"throughput {model} float32" in out and "2 x 8 in / 3 out" in out
    (row,) = json.loads(out_json.read_text())
    assert row["passed"] and row["failures"] == []
    assert row["output_tok_s"] > 0 and row["ttft_ms"] > 0 and row["tpot_ms"] > 0
    # --max-num-seqs 64 requests, each with room for 11 tokens: one 16-token block each
    assert row["kv_blocks"] == 64


def test_quantization_rows_rehearsed_on_the_cpu(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    """`--quantization`: an accuracy row per tiny shape and scheme, and a throughput row per scheme."""
    model = tiny_checkpoint("moe_shared_tied")
    out_json = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--model", str(model), "--dtype", "float32", "--num-prompts", "2",
            "--input-len", "8", "--output-len", "3", "--skip-conformance", "--quantization", "wint8,wint4",
            "--accuracy-sequences", "1", "--output-json", str(out_json)]  # fmt: skip
    gpu_check.main(argv)  # 1 where a random tiny shape misses an accuracy target; the rows say which
    rows = {row["check"]: row for row in json.loads(out_json.read_text())}
    shapes = [name for name, _ in tiny_models()]
    labels = {"wint8": "wint8 (per output channel)", "wint4": "wint4 (groups of 128)"}  # the serving defaults
    for scheme in ("wint8", "wint4"):
        for shape in shapes:
            row = rows[f"accuracy {labels[scheme]} vs bf16, {shape}"]
            top1 = float(row["result"].split()[1].rstrip("%,")) / 100
            assert row["passed"] == (top1 >= gpu_check.ACCURACY_TARGETS[scheme]), row
            assert "128 positions" in row["result"] and row["failures"] == ([] if row["passed"] else [
                f"top-1 below the {gpu_check.ACCURACY_TARGETS[scheme]:.0%} target"])  # fmt: skip
        assert rows[f"accuracy {labels[scheme]} vs bf16, tiny moe_shared_tied"]["passed"]
        throughput_row = rows[f"throughput {model} float32 {scheme}"]
        assert throughput_row["passed"] and throughput_row["output_tok_s"] > 0
        assert throughput_row["result"].startswith(
            f"ernie-serve (torch {scheme}): "
        )  # the engine that ran was quantized
    assert rows[f"throughput {model} float32"]["passed"]
    assert rows[f"throughput {model} float32"]["result"].startswith("ernie-serve (torch): ")
    assert len(rows) == 2 * len(shapes) + 3


def test_unknown_quantization_scheme_is_refused_before_any_check() -> None:
    with pytest.raises(SystemExit, match="--quantization takes wint8, wint4; got int3"):
        gpu_check.main(["--device", "cpu", "--quantization", "wint8,int3"])


def test_trained_model_row_rehearsed_on_the_cpu(trained_model_cached, tiny_checkpoint, tmp_path: Path) -> None:
    """`--trained-model`: one more accuracy row per scheme, on the trained model over held-out text."""
    out_json = tmp_path / "rows.json"
    model = tiny_checkpoint("moe_shared_tied")  # not a preset: no preset-sized accuracy row
    argv = ["--device", "cpu", "--model", str(model), "--skip-conformance", "--skip-throughput",
            "--quantization", "wint8", "--trained-model", "--accuracy-sequences", "1",
            "--output-json", str(out_json)]  # fmt: skip
    gpu_check.main(argv)
    rows = {row["check"]: row for row in json.loads(out_json.read_text())}
    row = rows["accuracy wint8 (per output channel) vs bf16, trained MoE, held-out text"]
    assert row["result"].startswith("top-1 ") and "128 positions" in row["result"]  # measured, not an error row
    assert len(rows) == len(tiny_models()) + 1


def test_trained_model_without_quantization_is_refused() -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--trained-model"])
