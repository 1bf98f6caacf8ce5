"""`python -m ernie_serve.bench.parallel`: tensor parallelism against one process on this machine's cores.

Runs `bench throughput`'s workload (by default the mixed one on the ~70M CPU benchmark model) through one
engine with `--tensor-parallel-size 1` on `threads` threads and one with `--tensor-parallel-size N` (with
`--expert-parallel`: and expert parallelism) on `threads / N` threads per rank, so that both use the same
cores; the engines take turns for `rounds` rounds and medians are reported. For each parallel engine it also
reports the communication share of a step: the time rank 0 spends inside collectives (the all-reduces and the
logits gather, waiting for the other ranks included) over the workload's wall time, and the collectives per
step. Prints a table; `--output-json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ernie_serve.bench.throughput import _warm_up_request, decode_rate, describe_workload, run_workload
from ernie_serve.bench.workload import bench_checkpoint, mixed_workload
from ernie_serve.core.config import EngineSettings
from ernie_serve.engine import Engine
from ernie_serve.logging import configure_logging


@dataclass
class ParallelResult:
    """One engine's figures over the rounds (medians)."""

    system: str
    threads_per_rank: int
    output_tok_s: list[float] = field(default_factory=list)
    comm_share: list[float] = field(default_factory=list)  # collective seconds on rank 0 / workload seconds
    us_per_collective: list[float] = field(default_factory=list)  # mean time in one collective on rank 0
    decode_tok_s: float | None = None  # one request alone, after the rounds

    def row(self) -> str:
        tok_s = statistics.median(self.output_tok_s)
        share = f"{100 * statistics.median(self.comm_share):.0f}%" if self.comm_share else "-"
        per_call = f"{statistics.median(self.us_per_collective):.0f}" if self.us_per_collective else "-"
        decode = f"{self.decode_tok_s:.1f}" if self.decode_tok_s else "-"
        return f"{self.system:<22} {self.threads_per_rank:>7} {tok_s:>10.1f} {decode:>10} {share:>11} {per_call:>10}"


def _collectives(engine: Engine) -> Any:
    runtime = getattr(engine.core.backend, "runtime", None)
    return None if runtime is None else runtime.collectives


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ernie_serve.bench.parallel", description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the ~70M CPU benchmark model)")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="compute threads in all (default: 2)")
    parser.add_argument("--expert-parallel", action="store_true", help="the N ranks split experts by expert")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    configure_logging("console", "warning")

    n, threads = args.tensor_parallel_size, args.threads
    # (each collective's share is rank 0's view: waiting for a slower rank counts as communication)
    model = args.model or str(bench_checkpoint())
    workload = mixed_workload(num_requests=args.num_requests, seed=0, vocab=2000)
    # one parallel engine per process (it owns the default process group): TP=1 takes turns with it
    parallel: dict[str, Any] = {"tensor_parallel_size": n}
    name = f"TP={n}"
    if args.expert_parallel:
        parallel["backend_options"] = {"enable_expert_parallel": True}
        name += " expert-parallel"
    systems: dict[str, tuple[dict[str, Any], int]] = {"TP=1": ({}, threads), name: (parallel, max(1, threads // n))}
    engines: dict[str, Engine] = {}
    results = {name: ParallelResult(name, t) for name, (_, t) in systems.items()}
    try:
        for name, (settings, per_rank) in systems.items():
            torch.set_num_threads(per_rank)  # spawned ranks start with rank 0's thread count
            engines[name] = Engine(EngineSettings(model=model, device=args.device, **settings))
            run_workload(engines[name], [_warm_up_request(workload)], f"{name} warm-up")
        produced = sum(r.output_len for r in workload)
        for round_ in range(args.rounds):
            for name, engine in engines.items():
                torch.set_num_threads(systems[name][1])
                collectives = _collectives(engine)
                before = (collectives.seconds, collectives.calls) if collectives else (0.0, 0)
                seconds, _ = run_workload(engine, workload, f"{name} round {round_ + 1}")
                results[name].output_tok_s.append(produced / seconds)
                if collectives:
                    spent, calls = collectives.seconds - before[0], collectives.calls - before[1]
                    results[name].comm_share.append(spent / seconds)
                    results[name].us_per_collective.append(1e6 * spent / calls)
        for name, engine in engines.items():
            torch.set_num_threads(systems[name][1])
            results[name].decode_tok_s = decode_rate(engine)
    finally:
        for engine in engines.values():
            engine.close()
    print(f"model: {model}\nworkload: {describe_workload(workload)}; {args.rounds} rounds, medians")
    print(f"{'system':<22} {'threads':>7} {'out tok/s':>10} {'decode':>10} {'comm share':>11} {'us/coll':>10}")
    for result in results.values():
        print(result.row())
    if args.output_json:
        with open(args.output_json, "w") as out:
            json.dump([asdict(r) for r in results.values()], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
