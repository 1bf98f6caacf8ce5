"""`ernie-serve bench throughput`: the offline engine against transformers' `generate` on the same weights and
the same mixed workload, in one run, so the ratio is fair on a noisy machine."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ernie_serve.bench.workload import BenchRequest, bench_checkpoint, mixed_workload


@dataclass
class ThroughputResult:
    system: str
    requests: int
    output_tokens: int  # requested output tokens (what a user asked for)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


def time_workload(llm, workload: list[BenchRequest]) -> float:
    """Seconds for `llm` (an `LLM`) to generate the whole workload submitted at once; checks every requested
    token was produced."""
    from ernie_serve import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in workload], params)
    seconds = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    requested = sum(r.output_len for r in workload)
    assert produced == requested, f"ernie-serve produced {produced} tokens, {requested} were requested"
    return seconds


def run_ernie_serve(checkpoint: Path, workload: list[BenchRequest], **settings) -> ThroughputResult:
    from ernie_serve import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), **settings)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate({"prompt_token_ids": workload[0].prompt_token_ids}, warm)
    seconds = time_workload(llm, workload)
    llm.engine.close()
    requested = sum(r.output_len for r in workload)
    return ThroughputResult(f"ernie-serve ({llm.engine.backend.name})", len(workload), requested, seconds)


def run_transformers(checkpoint: Path, workload: list[BenchRequest], batch_size: int = 16) -> ThroughputResult:
    """Static batches with left padding; each batch runs until its longest request has all its tokens."""
    import torch

    from ernie_serve.testing.checkpoints import load_reference

    model = load_reference(checkpoint)
    pad = 0

    def generate(batch: list[BenchRequest]) -> None:
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

    generate(workload[:1])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(workload), batch_size):
        generate(workload[start : start + batch_size])
    seconds = time.perf_counter() - started
    return ThroughputResult("transformers", len(workload), sum(r.output_len for r in workload), seconds)


# one request alone: a 32-token prompt, then 128 tokens decoded one per step
SINGLE_DECODE_REQUEST = BenchRequest(list(range(10, 42)), 128)


def decode_rate(llm, new_tokens: int = SINGLE_DECODE_REQUEST.output_len) -> float:
    """Decode tokens/s of `SINGLE_DECODE_REQUEST`'s prompt alone on `llm` (an idle `LLM`), prefill excluded."""
    from ernie_serve import SamplingParams

    engine = llm.engine
    engine.add_request(
        SINGLE_DECODE_REQUEST.prompt_token_ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    )
    engine.step()  # prefill + first token
    started, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - started)


def single_request_decode(checkpoint: Path, repeats: int = 5, **settings) -> float:
    """Median `decode_rate` over `repeats` passes on a fresh engine."""
    from ernie_serve import LLM

    llm = LLM(model=str(checkpoint), **settings)
    rates = [decode_rate(llm) for _ in range(repeats)]
    llm.engine.close()
    return statistics.median(rates)


def main(
    model: str | None,
    num_requests: int,
    seed: int,
    skip_transformers: bool,
    output_json: str | None,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    profile: bool = False,
    backend: str = "torch",
) -> int:
    checkpoint = Path(model) if model else bench_checkpoint()
    from ernie_serve.core.config import ModelConfig

    vocab = min(2000, ModelConfig.from_pretrained(checkpoint).vocab_size)
    workload = mixed_workload(num_requests=num_requests, seed=seed, vocab=vocab)
    print(f"model: {checkpoint}")
    print(
        f"workload: {len(workload)} requests, prompts {min(len(r.prompt_token_ids) for r in workload)}.."
        f"{max(len(r.prompt_token_ids) for r in workload)} tokens, outputs "
        f"{min(r.output_len for r in workload)}..{max(r.output_len for r in workload)} tokens, greedy, ignore_eos"
    )
    settings = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, backend=backend)
    results = [run_ernie_serve(checkpoint, workload, **settings)]
    if not skip_transformers:
        results.append(run_transformers(checkpoint, workload))
    decode = single_request_decode(checkpoint, backend=backend)

    print(f"\n{'system':<20} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10}")
    for r in results:
        print(f"{r.system:<20} {r.requests:>8} {r.output_tokens:>10} {r.seconds:>8.2f} {r.tokens_per_second:>10.1f}")
    summary: dict = {"results": [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in results]}
    if len(results) == 2:
        ratio = results[0].tokens_per_second / results[1].tokens_per_second
        summary["ratio"] = ratio
        print(f"\nernie-serve / transformers throughput: {ratio:.2f}x")
    summary["single_request_decode_tok_s"] = decode
    print(f"single-request decode (ernie-serve, median of 5): {decode:.1f} tok/s")
    if profile:
        summary["profile"] = profile_breakdown(checkpoint, workload, **settings)
        _print_breakdown("the mixed workload", summary["profile"])
        summary["decode_profile"] = profile_breakdown(checkpoint, [SINGLE_DECODE_REQUEST], **settings)
        _print_breakdown("single-request decode", summary["decode_profile"])
    if output_json:
        Path(output_json).write_text(json.dumps(summary, indent=2))
    return 0


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

    def __init__(self, inner, call) -> None:
        self._inner, self._call = inner, call

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def profile_breakdown(checkpoint: Path, workload: list[BenchRequest], **settings) -> dict[str, float]:
    """Where the offline engine's time goes on the workload, as fractions of the wall time of an unprofiled
    run: the engine phases (timed directly), and within the model, time in matmuls, attention kernels and KV
    gathers (torch profiler self times, from a second, profiled run; torch backend only)."""
    from torch.profiler import ProfilerActivity, profile

    from ernie_serve import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), **settings)
    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload]
    phases = {"schedule": 0.0, "backend.execute": 0.0, "sample": 0.0, "update": 0.0}

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - started

        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.backend.execute = timed("backend.execute", engine.backend.execute)
    engine.sampler = _Timed(engine.sampler, timed("sample", engine.sampler))
    engine.scheduler.update = timed("update", engine.scheduler.update)
    llm.generate(prompts[:1], params[:1])  # warm-up
    phases = dict.fromkeys(phases, 0.0)
    started = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - started
    phase_seconds = dict(phases)  # the profiled run below keeps adding to `phases`
    result = {f"engine: {name}": seconds / wall for name, seconds in phase_seconds.items()}
    result["engine: detokenize, outputs, rest"] = max(0.0, 1 - sum(phase_seconds.values()) / wall)
    result["wall_seconds"] = wall
    if engine.backend.name != "torch":  # the torch profiler sees no other backend's kernels
        engine.close()
        return result

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params)
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
