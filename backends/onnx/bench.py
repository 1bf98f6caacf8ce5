"""onnx backend against torch backend on the engine's CPU benchmark, in one run.

    python -m ernie_serve.backends.onnx.bench [--requests 48] [--max-num-seqs 64] [--max-num-batched-tokens 2048]

The model and workload are `ernie_serve.bench.workload`'s: a ~70M-parameter ERNIE-MoE (hidden 512, 8 layers,
16 experts top-4, 1 shared expert, vocab 32000) with random weights, and 48 greedy requests with prompts of
16..256 tokens and outputs of 16..128 tokens. Each backend first runs a warm-up request (the onnx export is
made, or found in the cache, before timing starts, and counts as start-up), then the whole workload as one
`generate` call, then one request alone for its decode rate. With `--rounds N` the backends alternate N times
and the medians are reported, which keeps a noisy (shared) machine from favouring whichever ran first.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ernie_serve.bench.throughput import decode_rate, time_workload
from ernie_serve.bench.workload import bench_checkpoint, mixed_workload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the backends this many times; medians")
    parser.add_argument("--backends", default="onnx,torch", help="comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of either backend (default: 2)")
    args = parser.parse_args(argv)

    import torch

    from ernie_serve import LLM, SamplingParams

    torch.set_num_threads(args.threads)  # the onnx backend follows torch's thread count
    checkpoint = bench_checkpoint()
    workload = mixed_workload(num_requests=args.requests)
    requested = sum(r.output_len for r in workload)
    print(
        f"model: {checkpoint}\nworkload: {len(workload)} requests, {requested} output tokens, greedy; "
        f"--max-num-seqs {args.max_num_seqs} --max-num-batched-tokens {args.max_num_batched_tokens}; "
        f"threads {torch.get_num_threads()}"
    )
    settings = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    backends = args.backends.split(",")
    llms, startup = {}, {}
    for backend in backends:
        started = time.perf_counter()
        llms[backend] = LLM(model=str(checkpoint), backend=backend, **settings)
        warm = {"prompt_token_ids": workload[0].prompt_token_ids}
        llms[backend].generate(warm, SamplingParams(temperature=0, max_tokens=4))
        startup[backend] = time.perf_counter() - started
    runs: dict[str, list[float]] = {b: [] for b in backends}
    decodes: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.rounds):
        for backend in backends:
            runs[backend].append(time_workload(llms[backend], workload))
            decodes[backend].append(decode_rate(llms[backend], new_tokens=64))
    print(f"\n{'backend':<8} {'start s':>8} {'run s':>8} {'out tok/s':>10} {'1-request decode tok/s':>23}")
    for backend in backends:
        seconds = statistics.median(runs[backend])
        decode = statistics.median(decodes[backend])
        print(f"{backend:<8} {startup[backend]:>8.1f} {seconds:>8.1f} {requested / seconds:>10.1f} {decode:>23.1f}")
    if len(backends) == 2:
        a, b = backends
        ratio = statistics.median(runs[b]) / statistics.median(runs[a])
        print(f"\n{a} / {b} throughput: {ratio:.2f}x")
    for llm in llms.values():
        llm.engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
