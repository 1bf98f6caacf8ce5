"""The ranks of a tensor-parallel torch backend: torchrun's launch, a world size that does not match, and the
reasons given for a rank that ended."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from ernie_serve.backends.torch.backend import TorchBackend, TorchOptions
from ernie_serve.backends.torch.distributed import RankEnv, exit_reason
from ernie_serve.backends.torch.parallel import ParallelConfigError
from ernie_serve.core.config import EngineSettings
from ernie_serve.models import read_model_config


def _generate(*launcher: str, checkpoint: str, flags: list[str]) -> subprocess.CompletedProcess[str]:
    command = [*launcher, "-m", "ernie_serve.cli", "generate", "--model", checkpoint, "--max-tokens", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "--temperature", "0", *flags, "Hello there"], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_runs_rank_0_as_the_command_and_the_others_as_workers(tiny_checkpoint) -> None:
    """The multi-host entry point, on one host: `torchrun -m ernie_serve.cli generate ...` on 2 ranks prints
    what one process prints."""
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.float32))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    parallel = _generate(*torchrun, checkpoint=checkpoint, flags=["--tensor-parallel-size", "2"])
    single = _generate(sys.executable, checkpoint=checkpoint, flags=[])
    assert parallel.returncode == 0 and single.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout and single.stdout.strip()
    assert "launched_by=torchrun" in parallel.stderr + parallel.stdout


def test_a_launcher_world_size_other_than_the_flag_is_refused_at_start(tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.float32)
    config = read_model_config(checkpoint)
    backend = TorchBackend(rank_env=RankEnv(0, 4, 0, "127.0.0.1", 1, torchrun=True))
    settings = EngineSettings(model=str(checkpoint), device="cpu", tensor_parallel_size=2)
    with pytest.raises(ParallelConfigError, match=r"--tensor-parallel-size 2 but the launcher started 4 ranks"):
        backend.load(config, settings, str(checkpoint), TorchOptions())


def test_exit_reasons_name_the_signal() -> None:
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(1) == "exited with code 1"
