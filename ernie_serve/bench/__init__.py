"""The benchmarks behind `ernie-serve bench`, all in this package.

- `throughput`: the offline engine on one or more backends against transformers' `generate` (`bench throughput`);
- `serve`: a running server over HTTP, or the in-process engine, on random prompts (`bench serve`, vLLM's
  `bench serve`);
- `scheduler`: the scheduler's own cost per step (`bench scheduler`);
- `soak`: streaming clients with random aborts for a fixed time against a server, checking failures, RSS growth
  and that the KV cache empties (`bench soak`, docs/reliability.md);
- `workload`: the CPU benchmark model and the request sets they share; `stats`: latency percentiles.

The GPU check (`python -m ernie_serve.testing.gpu_check`) runs `throughput` on a preset model.
"""
