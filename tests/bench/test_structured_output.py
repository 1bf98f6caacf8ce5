"""`ernie-serve bench structured-output` on the tiny checkpoint: the command runs both kinds of request and times
the steps it should (every request decoding, none finishing), never how fast they were."""

from __future__ import annotations

import re
from pathlib import Path

from ernie_serve.bench.structured_output import measure
from ernie_serve.cli import main


def test_times_the_decode_steps_of_both_kinds(bench_model: Path) -> None:
    result = measure(num_requests=3, output_len=6, prompt_len=8, rounds=2, model=str(bench_model))
    # per round and kind: the prefill step samples token 1, steps 2..5 decode, step 6 finishes every request
    assert result.steps == 2 * 4
    assert result.free > 0 and result.constrained > 0 and result.ratio == result.constrained / result.free
    assert result.sampler_free > 0 and result.sampler_constrained > 0


def test_command_prints_both_medians_and_their_ratio(bench_model: Path, capsys) -> None:
    args = ["bench", "structured-output", "--model", str(bench_model), "--requests", "2", "--output-len", "4"]
    assert main([*args, "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 concurrent requests, 4 output tokens each, 1 rounds" in out
    assert re.search(r"^free +\d+\.\d\d$", out, re.M) and re.search(r"^JSON-schema constrained +\d+\.\d\d$", out, re.M)
    assert re.search(r"^constrained / free +\d+\.\d{3}$", out, re.M)
    assert "(steps timed per kind: 2)" in out
    assert re.search(r"^sampler alone, constrained +\d+\.\d\d$", out, re.M)
    assert re.search(r"^constraints add -?\d+\.\d\d ms to a step: -?\d+\.\d% of the free step$", out, re.M)
