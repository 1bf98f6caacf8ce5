"""`python -m ernie_serve.testing.gpu_check parallel`: one line and exit 0 without two GPUs, and its checks
rehearsed over gloo on the CPU with a tiny checkpoint (`--device cpu`), since CI has no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ernie_serve.testing import gpu_check, gpu_parallel


def test_without_two_gpus_it_prints_one_line_and_exits_0(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["parallel"]) == 0
    assert capsys.readouterr().out == gpu_parallel.skip_line(0) + "\n"


def test_the_module_runs_as_a_script_without_a_gpu() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    command = [sys.executable, "-m", "ernie_serve.testing.gpu_check", "parallel"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [gpu_parallel.skip_line(0)]


def test_the_checks_rehearsed_on_the_cpu(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    """TP=2 over gloo: token identity with one process, and both throughput rows, on a tiny checkpoint."""
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = gpu_check.main(
            ["parallel", "--device", "cpu", "--identity-model", checkpoint, "--model", checkpoint]
            + ["--dtype", "float32", "--num-prompts", "2", "--input-len", "16", "--output-len", "4"]
            + ["--output-json", str(tmp_path / "rows.json")]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["check"].split(" ")[:2], r["passed"]) for r in rows] == [
        (["tokens", "TP=2"], True),
        (["throughput", "TP=1"], True),
        (["throughput", "TP=2"], True),
    ]
    assert rows[0]["result"] == f"{len(gpu_parallel.IDENTITY_PROMPTS)}/{len(gpu_parallel.IDENTITY_PROMPTS)} identical"
    assert all(r["output_tok_s"] > 0 for r in rows[1:])
