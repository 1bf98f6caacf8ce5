"""`ernie-serve bench throughput`: the offline engine's throughput on one or more backends, against
transformers' `generate` on the same weights and requests, in one run, so ratios are fair on a noisy machine.

Each system starts first: an engine is created and warmed up on one short request (the onnx backend's export
is made, or found in its cache, here, and counts as start-up), or transformers loads the checkpoint and warms
up. Then every system runs the whole workload submitted at once, `rounds` times, taking turns, and the median
is reported, so a machine shared with other work favours none of them; each round starts with the prefix cache
emptied, so no round reuses the prompts of the warm-up or of the round before. Last, each backend decodes one request
alone on a fresh engine (`decode_repeats` times after one warm-up pass, median), and with `profile` the
engine's time is broken down.

The workload is `workload.mixed_workload` (prompts 16..256 tokens, outputs 16..128), or with `input_len` and
`output_len` vLLM's random dataset at those fixed lengths (the GPU check's 8,000 in / 1,000 out).
TTFT and TPOT come from the engine's own request metrics: with every request submitted at once, TTFT
includes the time a request waits for the others' prefill.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ernie_serve.bench.stats import latency_ms
from ernie_serve.bench.workload import BenchRequest, bench_checkpoint, mixed_workload, random_requests
from ernie_serve.core.config import EngineSettings, ModelConfig
from ernie_serve.core.request import RequestOutput
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.demo import demo_checkpoint_dir
from ernie_serve.engine import Engine
from ernie_serve.logging import progress
from ernie_serve.quantization import QuantSpec, storage_bytes

# Random prompt ids are drawn below this (and below the tokenizer's size), as the recorded figures were.
WORKLOAD_VOCAB = 2000
WARM_UP_TOKENS = 4  # at most: never more than the workload's first request asks (it must fit the context)
# one request alone: a 32-token prompt, then 128 tokens decoded one per step
SINGLE_DECODE_REQUEST = BenchRequest(list(range(10, 42)), 128)
TRANSFORMERS_BATCH = 16


@dataclass(frozen=True)
class ThroughputConfig:
    """One `bench throughput` run; the CLI builds it from its flags."""

    model: str | None = None  # checkpoint directory, "demo" or a preset; None: the ~70M CPU benchmark model
    backends: tuple[str, ...] = ("torch",)  # ernie-serve backends, each one system (per quantization)
    quantizations: tuple[str | None, ...] = (None,)  # `--quantization` of each backend's systems; None: none
    num_requests: int = 48
    input_len: int | None = None  # with output_len: fixed lengths (vLLM's random dataset), else the mixed one
    output_len: int | None = None
    seed: int = 0  # the workload's
    rounds: int = 1  # workload runs per system, taking turns; medians are reported
    decode_repeats: int = 5  # single-request decode passes per backend on a fresh engine; 0 skips them
    compare_transformers: bool = True
    profile: bool = False
    threads: int | None = None  # torch (and onnxruntime) compute threads; None keeps torch's default
    bandwidth_bound: bool = False  # measure the read bandwidth before each decode pass: the fraction of the bound
    engine_settings: dict[str, Any] = field(default_factory=dict)  # further EngineSettings fields

    def __post_init__(self) -> None:
        if (self.input_len is None) != (self.output_len is None):
            raise ValueError("--input-len and --output-len go together")
        for name in ("num_requests", "rounds", "input_len", "output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.decode_repeats < 0:
            raise ValueError("--decode-repeats must be at least 0")
        if self.compare_transformers:  # it runs on the checkpoint's own weights: there must be some
            if self.engine_settings.get("load_format") == "dummy":
                raise ValueError("transformers needs real weights: with --load-format dummy add --skip-transformers")
            if self.model not in (None, "demo") and not Path(self.model).is_dir():
                raise ValueError(
                    f"transformers needs a checkpoint directory, not {self.model!r}: add --skip-transformers"
                )
        if not self.backends or len(set(self.backends)) != len(self.backends):
            raise ValueError(f"--backend must name distinct backends, got {','.join(self.backends)!r}")
        if not self.quantizations or len(set(self.quantizations)) != len(self.quantizations):
            raise ValueError("--quantization must name distinct schemes")

    @property
    def systems(self) -> list[str]:
        """The ernie-serve systems compared: each backend, once per quantization ("torch", "torch wint8")."""
        return [f"{b} {q}" if q else b for b in self.backends for q in self.quantizations]


@dataclass
class ThroughputResult:
    """One system's figures."""

    system: str
    requests: int
    output_tokens: int  # requested output tokens (what a user asked for); every one is checked to be produced
    seconds: float  # the workload's wall time, median over the rounds
    startup_seconds: float  # engine creation (or checkpoint loading) plus the warm-up request
    ttft_ms: dict[str, float] | None = None  # mean/median/p99 over the last round's requests (engines only)
    tpot_ms: dict[str, float] | None = None  # each request's mean inter-token latency, over requests
    kv_blocks: int | None = None  # the engine's KV pool, in blocks
    # prompt tokens the last round's requests found in the prefix cache (engines only): 0, since every round
    # starts with it emptied; a workload sharing prefixes within itself would count those here
    cached_prompt_tokens: int | None = None
    decode_tok_s: float | None = None  # single-request decode rate, median over the repeats
    decode_read_bytes: int | None = None  # weight bytes a decode step reads (with `bandwidth_bound`)
    read_bandwidth: float | None = None  # bytes/s, median over the decode passes (with `bandwidth_bound`)
    bound_fraction: float | None = None  # median over the passes of read bytes x tokens/s over that bandwidth

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


class BenchmarkError(RuntimeError):
    """The system under test did something a benchmark must not paper over (missing tokens)."""


# ----- running the engine -----


def engine_settings(config: ThroughputConfig, system: str) -> EngineSettings:
    """The settings of the engine of `system` (a backend, or "backend scheme") for this run."""
    backend, _, quantization = system.partition(" ")
    given = dict(config.engine_settings, quantization=quantization or None)
    return EngineSettings(model=checkpoint_of(config), backend=backend, **given)


def checkpoint_of(config: ThroughputConfig) -> str:
    return config.model if config.model is not None else str(bench_checkpoint())


def _finished_outputs(engine: Engine) -> Iterator[RequestOutput]:
    """Step `engine` until it is idle, yielding each request's final output as it finishes."""
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                yield output


def _warm_up_request(workload: Sequence[BenchRequest]) -> BenchRequest:
    """The workload's first prompt with a few output tokens: the shapes the run will see, cheaply."""
    first = workload[0]
    return BenchRequest(first.prompt_token_ids, min(WARM_UP_TOKENS, first.output_len))


def run_workload(engine: Engine, workload: Sequence[BenchRequest], description: str) -> tuple[float, list[Any]]:
    """Submit the whole workload at once (greedy, ignore_eos) to an idle engine and step it to the end, as
    `LLM.generate` does; returns the seconds taken and the final outputs. Raises `BenchmarkError` unless
    every requested token was produced."""
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    started = time.perf_counter()
    for request, request_params in zip(workload, params, strict=True):
        engine.add_request(request.prompt_token_ids, request_params)
    outputs = list(progress(_finished_outputs(engine), description, total=len(workload), unit="req"))
    seconds = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    requested = sum(r.output_len for r in workload)
    if produced != requested:
        raise BenchmarkError(f"ernie-serve produced {produced} tokens, {requested} were requested")
    return seconds, outputs


def request_latencies(outputs: Sequence[Any]) -> tuple[dict[str, float], dict[str, float]]:
    """TTFT and TPOT statistics (ms) from the final outputs' engine metrics; a request with one output token
    has no inter-token latency and counts for TTFT only."""
    metrics = [o.metrics or {} for o in outputs]
    ttft = [m["time_to_first_token"] for m in metrics if m.get("time_to_first_token") is not None]
    tpot = [m["mean_inter_token_latency"] for m in metrics if m.get("mean_inter_token_latency") is not None]
    return latency_ms(ttft), latency_ms(tpot)


def kv_blocks(engine: Engine) -> int:
    """The engine's KV pool size in blocks (what the engine logs as `kv_blocks` at start)."""
    return engine.core.num_blocks


def decode_rate(engine: Engine, new_tokens: int = SINGLE_DECODE_REQUEST.output_len) -> float:
    """Decode tokens/s of `SINGLE_DECODE_REQUEST`'s prompt alone on an idle `engine`, prefill excluded. The prefix
    cache is emptied first (`Engine.reset_prefix_cache`): an earlier pass's blocks would otherwise give the prompt
    a cached first block, and the request's context two runs of blocks that attention gathers every step."""
    if not engine.reset_prefix_cache():
        raise RuntimeError("decode_rate needs an idle engine")
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.add_request(SINGLE_DECODE_REQUEST.prompt_token_ids, params)
    engine.step()  # prefill + first token
    started, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - started)


def single_request_decode(
    settings: EngineSettings, repeats: int = 5, bandwidth_threads: int | None = None
) -> tuple[float, list[tuple[float, float]]]:
    """Median `decode_rate` over `repeats` passes on a fresh engine (no earlier workload's cache state), after
    one unmeasured pass of the same request: a fresh engine's first pass pays one-time costs (allocators grow,
    pages fault in, each runtime's first runs at each new shape; measured on the onnx backend: 168 tok/s on a
    session's first pass against 186-188 on the next two) that a serving engine pays once, and llama-bench,
    which docs/benchmarks.md compares against, likewise warms up before it measures.

    With `bandwidth_threads`, each pass is preceded by `read_bandwidth(bandwidth_threads)`; returns the median
    rate and each pass's (read bandwidth, rate), empty without."""
    engine = Engine(settings)
    rates: list[float] = []
    bandwidths: list[float] = []
    try:
        decode_rate(engine)  # warm-up, not measured
        for _ in progress(range(repeats), "single-request decode", unit="pass"):
            if bandwidth_threads:
                bandwidths.append(read_bandwidth(bandwidth_threads))
            rates.append(decode_rate(engine))
    finally:
        engine.close()
    return statistics.median(rates), list(zip(bandwidths, rates, strict=False))


def read_bandwidth(threads: int, size: int = 1 << 30, repeats: int = 9) -> float:
    """The machine's memory read bandwidth now, bytes/s: a float32 sum over `size` bytes on `threads` torch
    threads, median of `repeats` (after one unmeasured sum). This machine's bandwidth moves by 2x between hours,
    so the bound a decode rate is compared with is measured beside it. torch's thread count is restored: a
    backend may have lowered it for its own ops (the torch backend does when onnxruntime holds its weights)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(size // 4)
        data.sum()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            data.sum()
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return size / statistics.median(times)


def decode_read_bytes(config: ModelConfig, quantization: str | None, group_size: int | None, lm_head: bool) -> int:
    """Weight bytes one single-request decode step reads: every layer's attention projections and norms, its
    dense MLP or its router, k routed experts and shared experts, then the final norm and the LM head (and one
    embedding row). Quantized products count codes and float32 scales (`storage_bytes`, as stored; a kernel's own
    layout may differ by a few percent), the rest (biases too) float32; the LM head quantized when `lm_head`."""
    spec = QuantSpec.of(quantization, group_size) if quantization else None

    def product(out_features: int, in_features: int, quantized: bool = True, biased: bool = True) -> int:
        bias = 4 * out_features if biased and config.use_bias else 0  # linear biases stay float32
        if spec is None or not quantized:
            return 4 * out_features * in_features + bias
        return storage_bytes(out_features, in_features, spec) + bias

    c = config
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    total = 4 * h + product(c.vocab_size, h, lm_head, biased=False) + 4 * h  # embedding row, LM head, final norm
    for layer in range(c.num_hidden_layers):
        total += product(q + 2 * kv, h) + product(h, q) + 2 * 4 * h  # q|k|v, o, two norms
        if c.is_moe_layer(layer):
            width = c.moe_intermediate_size
            router = product(c.moe_num_experts, h, quantized=False, biased=False)
            total += router + 4 * c.moe_num_experts  # and its correction bias
            total += c.moe_k * (product(2 * width, h) + product(h, width))
            shared = width * c.moe_num_shared_experts  # the shared experts are one MLP this wide
            total += product(2 * shared, h) + product(h, shared) if shared else 0
        else:
            total += product(2 * c.intermediate_size, h) + product(h, c.intermediate_size)
    return total


# ----- transformers -----


def load_transformers(checkpoint: str) -> Any:
    """transformers' model of the checkpoint (float32, CPU), the comparison system."""
    from ernie_serve.testing.checkpoints import load_reference  # needs the test extra: only when comparing

    return load_reference(checkpoint)


def run_transformers(model: Any, workload: Sequence[BenchRequest], batch_size: int = TRANSFORMERS_BATCH) -> float:
    """Seconds for transformers' `generate` on the workload in static batches with left padding; each batch
    runs until its longest request has all its tokens."""
    pad = 0

    def generate(batch: Sequence[BenchRequest]) -> None:
        longest = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            n = len(request.prompt_token_ids)
            ids[row, longest - n :] = torch.tensor(request.prompt_token_ids)
            mask[row, longest - n :] = 1
        new_tokens = max(r.output_len for r in batch)
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    batches = [workload[start : start + batch_size] for start in range(0, len(workload), batch_size)]
    started = time.perf_counter()
    for batch in progress(batches, "transformers", unit="batch"):
        generate(batch)
    return time.perf_counter() - started


# ----- the run -----


def make_workload(config: ThroughputConfig, vocab: int) -> list[BenchRequest]:
    """The requests of this run, prompt ids drawn from [10, vocab)."""
    if config.input_len is not None and config.output_len is not None:
        return random_requests(config.num_requests, config.input_len, config.output_len, 0.0, vocab, config.seed)
    return mixed_workload(num_requests=config.num_requests, seed=config.seed, vocab=vocab)


def describe_workload(workload: Sequence[BenchRequest]) -> str:
    prompts = [len(r.prompt_token_ids) for r in workload]
    outputs = [r.output_len for r in workload]
    return (
        f"{len(workload)} requests, prompts {min(prompts)}..{max(prompts)} tokens ({sum(prompts)} in all), "
        f"outputs {min(outputs)}..{max(outputs)} tokens ({sum(outputs)} in all), greedy, ignore_eos"
    )


def _transformers_checkpoint(config: ThroughputConfig) -> str:
    """The directory transformers loads: the one ernie-serve reads its weights from."""
    checkpoint = checkpoint_of(config)
    return str(demo_checkpoint_dir()) if checkpoint == "demo" else checkpoint


def run(
    config: ThroughputConfig, log: Callable[[str], None] = print
) -> tuple[list[BenchRequest], list[ThroughputResult]]:
    """Start every system, run the rounds, then the single-request decodes; returns the workload and one
    result per system (backends in order, then transformers). `log` gets the model and workload lines."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # the onnx backend follows torch's thread count
    # the bandwidth bound is read on the run's threads, taken before a backend may lower torch's own
    bandwidth_threads = torch.get_num_threads() if config.bandwidth_bound else None
    reference_checkpoint = _transformers_checkpoint(config) if config.compare_transformers else None
    engines: dict[str, Engine] = {}
    startup: dict[str, float] = {}
    seconds: dict[str, list[float]] = {}
    last_outputs: dict[str, list[Any]] = {}
    results: list[ThroughputResult] = []
    try:
        for backend in config.systems:
            started = time.perf_counter()
            engines[backend] = Engine(engine_settings(config, backend))
            startup[backend] = time.perf_counter() - started
        first = next(iter(engines.values()))
        workload = make_workload(config, min(WORKLOAD_VOCAB, len(first.tokenizer)))
        log(f"model: {checkpoint_of(config)}")
        log(f"workload: {describe_workload(workload)}")
        warm_up = [_warm_up_request(workload)]
        for backend, engine in engines.items():
            started = time.perf_counter()
            run_workload(engine, warm_up, f"{backend} warm-up")
            startup[backend] += time.perf_counter() - started
            seconds[backend] = []
        reference = None
        if reference_checkpoint is not None:
            started = time.perf_counter()
            reference = load_transformers(reference_checkpoint)
            run_transformers(reference, workload[:1])  # warm-up
            startup["transformers"] = time.perf_counter() - started
            seconds["transformers"] = []
        for round_index in range(config.rounds):
            for backend, engine in engines.items():
                description = f"{backend}, round {round_index + 1}/{config.rounds}"
                # every round meets the workload as new: prompts cached by the warm-up or an earlier round
                # would skip their prefill (measured: 1.33-1.68x the torch backend's mixed workload)
                if not engine.reset_prefix_cache():
                    raise RuntimeError(f"{backend}: the engine is not idle between rounds")
                elapsed, last_outputs[backend] = run_workload(engine, workload, description)
                seconds[backend].append(elapsed)
            if reference is not None:
                seconds["transformers"].append(run_transformers(reference, workload))
        requested = sum(r.output_len for r in workload)
        for backend, engine in engines.items():
            ttft, tpot = request_latencies(last_outputs[backend])
            system = f"ernie-serve ({backend})"
            median = statistics.median(seconds[backend])
            cached = sum((o.metrics or {}).get("num_cached_tokens", 0) for o in last_outputs[backend])
            results.append(
                ThroughputResult(
                    system, len(workload), requested, median, startup[backend], ttft, tpot, kv_blocks(engine),
                    cached_prompt_tokens=cached,
                )
            )  # fmt: skip
        if reference is not None:
            median = statistics.median(seconds["transformers"])
            results.append(ThroughputResult("transformers", len(workload), requested, median, startup["transformers"]))
    finally:
        for engine in engines.values():
            engine.close()
    if config.decode_repeats:
        for backend, result in zip(config.systems, results[: len(config.systems)], strict=True):
            settings = engine_settings(config, backend)
            result.decode_tok_s, passes = single_request_decode(settings, config.decode_repeats, bandwidth_threads)
            if passes:
                options = settings.backend_options  # either backend's flag keeping the LM head in float32
                lm_head = options.get("quantize_lm_head", options.get("onnx_quantize_lm_head", True))
                read = decode_read_bytes(
                    first.model_config, settings.quantization, settings.quantization_group_size, lm_head
                )
                result.decode_read_bytes = read
                result.read_bandwidth = statistics.median(bandwidth for bandwidth, _ in passes)
                result.bound_fraction = statistics.median(read * rate / bandwidth for bandwidth, rate in passes)
    return workload, results


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mean(stats: dict[str, float] | None) -> float | None:
    return None if stats is None else stats["mean"]


def format_table(results: Sequence[ThroughputResult]) -> str:
    """One row per system: throughput, then the engine's latency means and KV pool."""
    lines = [
        f"{'system':<22} {'requests':>8} {'out tokens':>10} {'start s':>8} {'seconds':>8} {'out tok/s':>10} "
        f"{'TTFT ms':>9} {'TPOT ms':>8} {'KV blocks':>9}"
    ]
    for r in results:
        lines.append(
            f"{r.system:<22} {r.requests:>8} {r.output_tokens:>10} {r.startup_seconds:>8.1f} {r.seconds:>8.2f} "
            f"{r.tokens_per_second:>10.1f} {_cell(_mean(r.ttft_ms), '9.1f'):>9} "
            f"{_cell(_mean(r.tpot_ms), '8.2f'):>8} {_cell(r.kv_blocks, 'd'):>9}"
        )
    return "\n".join(lines)


def main(config: ThroughputConfig, output_json: str | None = None) -> int:
    """`ernie-serve bench throughput`: run, print the table and ratios, optionally write JSON; returns 0."""
    workload, results = run(config)
    print()
    print(format_table(results))
    summary: dict[str, Any] = {
        "workload": describe_workload(workload),
        "rounds": config.rounds,
        "results": [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in results],
    }
    engines = [r for r in results if r.system != "transformers"]
    transformers = next((r for r in results if r.system == "transformers"), None)
    print()
    if transformers is not None:
        summary["ratio"] = engines[0].tokens_per_second / transformers.tokens_per_second
        for r in engines:
            # the single-backend wording is the one the recorded figures used
            name = "ernie-serve" if len(engines) == 1 else r.system
            print(f"{name} / transformers throughput: {r.tokens_per_second / transformers.tokens_per_second:.2f}x")
    if len(engines) == 2:
        a, b = engines
        summary["backend_ratio"] = a.tokens_per_second / b.tokens_per_second
        print(f"{config.systems[0]} / {config.systems[1]} throughput: {summary['backend_ratio']:.2f}x")
    if config.decode_repeats:
        summary["single_request_decode_tok_s"] = engines[0].decode_tok_s
        for r in engines:
            print(f"single-request decode ({r.system}, median of {config.decode_repeats}): {r.decode_tok_s:.1f} tok/s")
            if r.bound_fraction is not None:
                assert r.decode_read_bytes is not None and r.read_bandwidth is not None
                print(
                    f"  {r.decode_read_bytes / 1e9:.3f} GB of weights read per token; read bandwidth beside it "
                    f"{r.read_bandwidth / 1e9:.1f} GB/s (median); {100 * r.bound_fraction:.0f}% of the bound"
                )
    if len(config.quantizations) > 1:  # each system against its backend's first (e.g. float32)
        firsts = {system.split(" ")[0]: i for i, system in reversed(list(enumerate(config.systems)))}
        for system, r in zip(config.systems, engines, strict=True):
            first = firsts[system.split(" ")[0]]
            base = engines[first]
            if r is base:
                continue
            ratio = r.tokens_per_second / base.tokens_per_second
            line = f"{system} / {config.systems[first]}: throughput {ratio:.2f}x"
            if r.decode_tok_s and base.decode_tok_s:
                line += f", single-request decode {r.decode_tok_s / base.decode_tok_s:.2f}x"
            print(line)
    if config.profile:
        settings = engine_settings(config, config.systems[0])
        summary["profile"] = profile_breakdown(settings, workload)
        _print_breakdown("the workload", summary["profile"])
        summary["decode_profile"] = profile_breakdown(settings, [SINGLE_DECODE_REQUEST])
        _print_breakdown("single-request decode", summary["decode_profile"])
    if output_json:
        Path(output_json).write_text(json.dumps(summary, indent=2))
    return 0


# ----- where the time goes -----


def _print_breakdown(title: str, breakdown: dict[str, float]) -> None:
    print(f"\nwhere the time goes, {title} ({breakdown['wall_seconds']:.1f} s run; fractions of wall time):")
    for name, fraction in breakdown.items():
        if name != "wall_seconds":
            print(f"  {name:<40} {fraction * 100:5.1f}%")
    if "torch ops: matmul" in breakdown:
        outside = 1 - breakdown["torch ops: matmul"]
        print(f"  {'outside the model matmuls':<40} {outside * 100:5.1f}%")


# torch operators grouped into the parts of a step the benchmark reports; on CPU the torch backend multiplies
# single rows with `embedding_bag` (weighted sums of weight rows) and several rows with oneDNN's linear
_MATMUL_OPS = {
    "mkldnn::_linear_pointwise",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "aten::embedding_bag",
    "aten::_embedding_bag",
    "aten::_embedding_bag_forward_only",
}
_ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention"}
_GATHER_OPS = {"aten::index_select", "aten::index", "aten::index_copy_", "aten::index_add_", "aten::index_fill_"}


class _Timed:
    """Stands in for an object whose calls are timed; everything else passes through."""

    def __init__(self, inner: Any, call: Callable[..., Any]) -> None:
        self._inner, self._call = inner, call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


def profile_breakdown(settings: EngineSettings, workload: Sequence[BenchRequest]) -> dict[str, float]:
    """Where the offline engine's time goes on the workload, as fractions of the wall time of an unprofiled
    run: the engine phases (timed directly), and within the model, time in matmuls, attention kernels and KV
    gathers (torch profiler self times, from a second, profiled run; torch backend only)."""
    engine = Engine(settings)
    phases = {"schedule": 0.0, "backend.execute": 0.0, "sample": 0.0, "update": 0.0}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - started

        return wrapper

    try:
        # Instance attributes shadow the methods for this engine only: the engine core's step
        # (schedule -> execute -> sample -> update), each part timed.
        core = engine.core
        core.scheduler.schedule = timed("schedule", core.scheduler.schedule)  # type: ignore[method-assign]
        core.backend.execute = timed("backend.execute", core.backend.execute)  # type: ignore[method-assign]
        core.sampler = _Timed(core.sampler, timed("sample", core.sampler))  # type: ignore[assignment]
        core.scheduler.update = timed("update", core.scheduler.update)  # type: ignore[method-assign]
        run_workload(engine, [_warm_up_request(workload)], "profile warm-up")
        phases = dict.fromkeys(phases, 0.0)
        wall, _ = run_workload(engine, workload, "profile, timed run")
        phase_seconds = dict(phases)  # the profiled run below keeps adding to `phases`
        result = {f"engine: {name}": seconds / wall for name, seconds in phase_seconds.items()}
        result["engine: detokenize, outputs, rest"] = max(0.0, 1 - sum(phase_seconds.values()) / wall)
        result["wall_seconds"] = wall
        if settings.backend != "torch":  # the torch profiler sees no other backend's kernels
            return result
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_workload(engine, workload, "profile, torch profiler run")
    finally:
        engine.close()
    ops = {"matmul": 0.0, "attention kernels": 0.0, "gather/scatter (KV, rows)": 0.0, "other torch ops": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in _MATMUL_OPS:
            ops["matmul"] += seconds
        elif event.key in _ATTENTION_OPS:
            ops["attention kernels"] += seconds
        elif event.key in _GATHER_OPS:
            ops["gather/scatter (KV, rows)"] += seconds
        elif event.key.startswith(("aten::", "mkldnn::")):
            ops["other torch ops"] += seconds
    return result | {f"torch ops: {name}": seconds / wall for name, seconds in ops.items()}
