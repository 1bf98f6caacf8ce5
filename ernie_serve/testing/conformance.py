"""The backend conformance suite: what every backend, built-in or a plugin's, must do to be served.

Given a registered backend name, it builds tiny real-format checkpoints with transformers (see
`checkpoints.py`) and runs the offline engine on them with that backend:

- `greedy_parity[<shape>]`, one per `TINY_SHAPES` entry (dense and MoE): greedy tokens identical to
  transformers' reference, chosen-token logprobs within `LOGPROB_TOLERANCE` and ranked first, for prompts
  of mixed lengths run as one batch under a small step budget (chunked prefill, block boundaries);
- `mixed_batching`: each prompt's greedy tokens and logprobs in that batch equal those of the prompt alone;
- `abort`: a request aborted mid-generation ends with finish reason "abort", the others are unaffected, no KV
  block is leaked, and the backend drops the state of requests once they end (`release`);
- `preemption`: in a KV pool too small for the batch, requests are preempted, released and re-run from scratch
  (`is_new`, with a whole new block table) while the others' tables grow by `new_block_ids`, and every request
  still gives transformers' greedy tokens;
- `seeded_sampling`: a seeded sampled request gives the same tokens every run and whatever shares its batch,
  and different seeds give different tokens.

Use it from pytest (one test per case, failures name the case):

    import pytest
    from ernie_serve.testing.conformance import BackendConformance, conformance_cases

    @pytest.fixture(scope="module")
    def conformance(tmp_path_factory):
        suite = BackendConformance("mybackend", tmp_path_factory.mktemp("conformance"))
        yield suite
        suite.close()

    @pytest.mark.parametrize("case", conformance_cases())
    def test_conformance(conformance, case):
        conformance.run_case(case)

or in one call, `run_conformance("mybackend")`, which raises `ConformanceError` listing every failed case.
Needs the test extra (transformers): `pip install 'ernie-serve[test]'`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ernie_serve.testing.checkpoints import TINY_SHAPES

if TYPE_CHECKING:
    from ernie_serve.core.request import CompletionOutput, RequestOutput
    from ernie_serve.llm import LLM

# Prompts of several lengths: shorter than a block, several blocks, one longer than the step budget.
PROMPTS: list[list[int]] = [
    [5, 6, 7],
    list(range(10, 31)),
    [100] * 9 + [7, 8],
    [300, 301],
    list(range(40, 90)),
]
NEW_TOKENS = 8
LOGPROB_TOLERANCE = 2e-3  # chosen-token logprob against transformers (float32 reference)
BATCH_LOGPROB_TOLERANCE = 1e-4  # the same backend batched vs alone: only summation order differs
# Computing in bfloat16/float16 (on a GPU) rounds every activation to 8/11 mantissa bits: logprobs then differ
# from the float32 reference by a few hundredths, and batched vs alone by the rounding of different kernels.
REDUCED_PRECISION_TOLERANCES = (0.3, 5e-2)  # (against transformers, batched vs alone)
# ... and a near-tie of the float32 reference may then be broken the other way: in reduced precision a greedy
# token must be the reference's argmax or within this many nats of it (teacher-forced on our own tokens).
REDUCED_PRECISION_GREEDY_GAP = 0.15
# Small blocks and a small step budget force chunked prefill, prompts split over steps and block boundaries.
ENGINE_SETTINGS: dict[str, Any] = {"block_size": 4, "max_num_batched_tokens": 24}
# 10 blocks of 4 tokens: PROMPTS[:4] with NEW_TOKENS each need 19 blocks together (the longest alone 8), so the
# scheduler must preempt some of them while the others run.
TIGHT_POOL: dict[str, Any] = {"num_gpu_blocks_override": 10}
DEFAULT_SHAPE = "moe_shared_tied"


class ConformanceError(AssertionError):
    """A backend failed one or more conformance cases; the message names each case and why."""


@dataclass
class CaseResult:
    name: str
    passed: bool
    seconds: float
    error: str | None = None  # the assertion message when it failed


def conformance_cases(shapes: Iterable[str] | None = None) -> list[str]:
    """The case names, in run order (usable as pytest parameters)."""
    shapes = list(TINY_SHAPES) if shapes is None else list(shapes)
    engine_cases = ["mixed_batching", "abort", "preemption", "seeded_sampling"]
    return [f"greedy_parity[{shape}]" for shape in shapes] + engine_cases


def _check_not_failed(output: RequestOutput, label: str) -> None:
    """An exception in a step ends its requests with finish reason "error" (the engine logs it and goes on)."""
    _check(
        all(c.finish_reason != "error" for c in output.outputs),
        f"{label}: the engine failed the request (finish reason 'error'; the log has the backend's traceback)",
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


class BackendConformance:
    """The suite for one backend. Checkpoints are built into `workdir` once and engines are reused across
    cases, so running every case costs one checkpoint build and one engine start per shape.

    `engine_settings` are extra `LLM(...)` keyword arguments (e.g. `device="cuda"`); they override
    `ENGINE_SETTINGS`. `checkpoints`, when given, maps a shape name to an existing bfloat16 tiny checkpoint
    (e.g. a session fixture's), instead of building one into `workdir`.

    With `quantization` among them, the reference is transformers on a copy of each checkpoint whose quantized
    tensors hold what the quantized model computes with (`write_dequantized_checkpoint`; the LM head too
    unless `quantize_lm_head=False`): a weight-only backend must then match it as a float32 one does.
    `approximate` says the backend rounds more than float32 does (bfloat16/float16 compute, the default for
    those dtypes, or activations quantized per call as W8A8 kernels do): the near-tie tolerances then apply.
    """

    def __init__(
        self,
        backend: str,
        workdir: str | Path | None = None,
        checkpoints: Callable[[str], Path] | None = None,
        approximate: bool | None = None,
        **engine_settings: Any,
    ) -> None:
        self.backend = backend
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ernie-conformance-"))
        self._checkpoint_factory = checkpoints
        self.engine_settings = {**ENGINE_SETTINGS, **engine_settings}
        reduced = self.engine_settings.get("dtype") in ("bfloat16", "float16") if approximate is None else approximate
        self.logprob_tolerance, self.batch_logprob_tolerance = (
            REDUCED_PRECISION_TOLERANCES if reduced else (LOGPROB_TOLERANCE, BATCH_LOGPROB_TOLERANCE)
        )
        self._llms: dict[str, LLM] = {}
        self._references: dict[str, Any] = {}

    # ----- fixtures -----
    def checkpoint(self, shape: str) -> Path:
        """The tiny bfloat16 checkpoint of `shape` (a `TINY_SHAPES` key), built on first use."""
        import torch

        from ernie_serve.testing.checkpoints import build_tiny_checkpoint

        if self._checkpoint_factory is not None:
            return Path(self._checkpoint_factory(shape))
        path = self.workdir / f"{shape}-bf16"
        if not (path / "config.json").is_file():
            build_tiny_checkpoint(path, shape, disk_dtype=torch.bfloat16)
        return path

    def llm(self, shape: str = DEFAULT_SHAPE, **overrides: Any) -> LLM:
        """An engine for `shape` on the backend under test (one per shape and overrides, reused)."""
        key = f"{shape}{sorted(overrides.items())}"
        if key not in self._llms:
            from ernie_serve.llm import LLM

            settings = {**self.engine_settings, **overrides}
            self._llms[key] = LLM(model=str(self.checkpoint(shape)), backend=self.backend, **settings)
        return self._llms[key]

    def reference(self, shape: str):
        if shape not in self._references:
            from ernie_serve.testing.checkpoints import load_reference

            self._references[shape] = load_reference(self.reference_checkpoint(shape))
        return self._references[shape]

    def reference_checkpoint(self, shape: str) -> Path:
        """The checkpoint transformers runs as the reference: the tiny one, or its dequantized copy."""
        scheme = self.engine_settings.get("quantization")
        if not scheme:
            return self.checkpoint(shape)
        from ernie_serve.quantization import QuantSpec, write_dequantized_checkpoint

        spec = QuantSpec.of(scheme, self.engine_settings.get("quantization_group_size", 128))
        lm_head = self.engine_settings.get("quantize_lm_head", True)
        path = self.workdir / f"{shape}-dequantized-{scheme}-g{spec.group_size}-head{int(lm_head)}"
        if not (path / "config.json").is_file():
            write_dequantized_checkpoint(self.checkpoint(shape), path, spec, lm_head)
        return path

    def close(self) -> None:
        """Shut the engines down (their backends' `close`)."""
        for llm in self._llms.values():
            llm.engine.close()
        self._llms.clear()
        self._references.clear()

    # ----- running -----
    def cases(self) -> dict[str, Callable[[], None]]:
        cases: dict[str, Callable[[], None]] = {
            f"greedy_parity[{shape}]": (lambda shape=shape: self.check_greedy_parity(shape)) for shape in TINY_SHAPES
        }
        cases["mixed_batching"] = self.check_mixed_batching
        cases["abort"] = self.check_abort
        cases["preemption"] = self.check_preemption
        cases["seeded_sampling"] = self.check_seeded_sampling
        return cases

    def run_case(self, name: str) -> None:
        """Run one case by name (see `conformance_cases`); raises `ConformanceError` when it fails."""
        cases = self.cases()
        if name not in cases:
            raise KeyError(f"unknown conformance case {name!r}; cases: {', '.join(cases)}")
        try:
            cases[name]()
        except BaseException as exc:
            self.close()  # a failed case may leave requests queued: later cases start on fresh engines
            if isinstance(exc, ConformanceError):
                raise ConformanceError(f"backend {self.backend!r}, {name}: {exc}") from None
            raise

    def run_all(self, names: Iterable[str] | None = None) -> list[CaseResult]:
        """Run the named cases (default: all), collecting every result instead of stopping at the first."""
        results = []
        for name in names or conformance_cases():
            started = time.monotonic()
            try:
                self.run_case(name)
            except ConformanceError as exc:
                results.append(CaseResult(name, False, time.monotonic() - started, str(exc)))
            except Exception as exc:  # a crashing backend fails its case; the other cases still run
                error = f"backend {self.backend!r}, {name}: raised {type(exc).__name__}: {exc}"
                results.append(CaseResult(name, False, time.monotonic() - started, error))
            else:
                results.append(CaseResult(name, True, time.monotonic() - started))
        return results

    # ----- the checks -----
    def _greedy(self, llm: LLM, prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> list[RequestOutput]:
        from ernie_serve.core.sampling_params import SamplingParams

        # the runner-up's logprob too: in reduced precision a near-tie may be broken either way
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for i, output in enumerate(outputs):
            _check_not_failed(output, f"prompt {i}")
        return outputs

    def check_greedy_parity(self, shape: str) -> None:
        """Greedy tokens equal transformers'; chosen-token logprobs within the tolerance and ranked 1. In
        bfloat16/float16 a greedy token may instead be a near-tie of the reference's (`REDUCED_PRECISION_...`)."""
        outputs = self._greedy(self.llm(shape), PROMPTS)
        reference = self.reference(shape)
        for i, (prompt, output) in enumerate(zip(PROMPTS, outputs, strict=True)):
            completion = output.outputs[0]
            theirs = self._check_greedy_tokens(reference, prompt, completion.token_ids, f"prompt {i}")
            _check(completion.finish_reason == "length", f"prompt {i}: finish reason {completion.finish_reason!r}")
            _check(completion.logprobs is not None, f"prompt {i}: no logprobs returned although asked for")
            ours = [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids, strict=True)]
            worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
            _check(
                worst <= self.logprob_tolerance,
                f"prompt {i}: chosen-token logprobs differ from transformers by up to {worst:.2e} "
                f"(tolerance {self.logprob_tolerance:.0e}): {ours} vs {theirs}",
            )
            ranks = [entry[t].rank for entry, t in zip(completion.logprobs, completion.token_ids, strict=True)]
            _check(all(r == 1 for r in ranks), f"prompt {i}: greedy tokens must have rank 1, got {ranks}")

    def _check_greedy_tokens(self, reference: Any, prompt: list[int], token_ids: list[int], label: str) -> list[float]:
        """Greedy `token_ids` for `prompt` against transformers: equal to its greedy tokens, or in bfloat16/
        float16 each within `REDUCED_PRECISION_GREEDY_GAP` of its argmax (teacher-forced on our tokens).
        Returns transformers' logprob of each of our tokens."""
        from ernie_serve.testing.checkpoints import reference_greedy, reference_logprob_rows

        rows = reference_logprob_rows(reference, prompt, token_ids)  # [T, V]
        theirs = [float(rows[j, t]) for j, t in enumerate(token_ids)]
        if self.logprob_tolerance != LOGPROB_TOLERANCE:  # reduced precision
            gaps = [float(rows[j].max()) - lp for j, lp in enumerate(theirs)]
            _check(
                max(gaps) <= REDUCED_PRECISION_GREEDY_GAP,
                f"{label} (length {len(prompt)}): greedy tokens {token_ids} fall up to {max(gaps):.2f} nats below "
                f"transformers' argmax (allowed {REDUCED_PRECISION_GREEDY_GAP})",
            )
        else:
            expected = reference_greedy(reference, prompt, len(token_ids))
            _check(
                token_ids == expected,
                f"{label} (length {len(prompt)}): greedy tokens {token_ids}, transformers {expected}",
            )
        return theirs

    def check_mixed_batching(self, shape: str = DEFAULT_SHAPE) -> None:
        """Prompts of mixed lengths batched together give what each gives alone."""
        llm = self.llm(shape)
        together = self._greedy(llm, PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            alone = self._greedy(llm, [prompt])[0].outputs[0]
            self._check_same_greedy(together[i].outputs[0], alone, f"prompt {i}: batched vs alone")

    def _check_same_greedy(self, ours: CompletionOutput, alone: CompletionOutput, label: str) -> None:
        """One greedy request run in two batches gives the same tokens, logprobs within the batch tolerance.
        In bfloat16/float16 other batch shapes round differently: the tokens may part at a near-tie (the other
        token is the runner-up within `REDUCED_PRECISION_GREEDY_GAP`), and are compared up to there."""
        assert ours.logprobs is not None and alone.logprobs is not None
        pairs_of_ids = zip(ours.token_ids, alone.token_ids, strict=True)
        parted = next((j for j, (a, b) in enumerate(pairs_of_ids) if a != b), None)  # where they part
        if parted is not None and self.logprob_tolerance != LOGPROB_TOLERANCE:  # reduced precision
            entry, other = ours.logprobs[parted], alone.token_ids[parted]
            gap = entry[ours.token_ids[parted]].logprob - entry[other].logprob if other in entry else None
            _check(
                gap is not None and gap <= REDUCED_PRECISION_GREEDY_GAP,
                f"{label}: tokens {ours.token_ids} part from {alone.token_ids} at {parted} by more than a near-tie",
            )
        else:
            _check(ours.token_ids == alone.token_ids, f"{label}: tokens {ours.token_ids} != {alone.token_ids}")
        pairs = list(zip(ours.logprobs, alone.logprobs, ours.token_ids, strict=True))[:parted]
        worst = max(abs(a[t].logprob - b[t].logprob) for a, b, t in pairs) if pairs else 0.0
        _check(
            worst <= self.batch_logprob_tolerance,
            f"{label}: logprobs differ by {worst:.2e} (tolerance {self.batch_logprob_tolerance:.0e})",
        )

    def check_abort(self, shape: str = DEFAULT_SHAPE) -> None:
        """Abort one running request mid-generation: it ends "abort", the others are unaffected, the KV pool
        gets every block back, and the backend forgets the request."""
        from ernie_serve.core.sampling_params import SamplingParams

        llm = self.llm(shape)
        engine = llm.engine
        prompts = PROMPTS[:4]
        max_tokens = 12
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
        ids = [engine.add_request(list(p), params) for p in prompts]
        victim = ids[1]
        finished: dict[str, RequestOutput] = {}
        aborted = False
        for _ in range(10_000):
            if not engine.has_unfinished_requests():
                break
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
                if output.request_id == victim and not aborted and len(output.outputs[0].token_ids) >= 3:
                    engine.abort_request(victim)
                    aborted = True
        _check(aborted, "the victim request never produced 3 tokens")
        _check(not engine.has_unfinished_requests(), "requests still unfinished after 10000 steps")
        _check(set(finished) == set(ids), f"finished outputs for {sorted(finished)}, expected {sorted(ids)}")
        cut = finished[victim].outputs[0]
        _check(cut.finish_reason == "abort", f"aborted request finished with {cut.finish_reason!r}")
        _check(len(cut.token_ids) < max_tokens, f"aborted request still produced {len(cut.token_ids)} tokens")

        alone = self._greedy(llm, [list(p) for p in prompts], max_tokens)
        for i, (request_id, reference) in enumerate(zip(ids, alone, strict=True)):
            if request_id != victim:
                self._check_same_greedy(
                    finished[request_id].outputs[0], reference.outputs[0], f"prompt {i}, beside an abort"
                )

        block_manager = getattr(engine.core.scheduler, "block_manager", None)
        if block_manager is not None:
            free, total = block_manager.num_free_blocks, block_manager.num_blocks
            _check(free == total, f"{total - free} KV blocks leaked after every request finished")
        # Backends that keep per-request state may expose how many requests they hold: the engine releases
        # each request as it ends, so nothing may remain.
        held = engine.core.backend.num_cached_requests
        _check(not held, f"the backend still holds state for {held} requests after they all ended")

    def check_preemption(self, shape: str = DEFAULT_SHAPE) -> None:
        """Requests preempted for want of KV blocks are released and re-run from scratch (`is_new`, a whole new
        block table, often other blocks) and still give transformers' greedy tokens, as do the requests that
        kept running while their tables grew by `new_block_ids`."""
        llm = self.llm(shape, **TIGHT_POOL)
        prompts = PROMPTS[:4]
        before = llm.engine.core.scheduler.stats().num_preemptions
        outputs = self._greedy(llm, prompts)
        preempted = llm.engine.core.scheduler.stats().num_preemptions - before
        _check(preempted > 0, f"nothing was preempted in a pool of {TIGHT_POOL}: the case tested nothing")
        reference = self.reference(shape)
        for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            label = f"prompt {i}, after {preempted} preemptions"
            self._check_greedy_tokens(reference, prompt, output.outputs[0].token_ids, label)
        held = llm.engine.core.backend.num_cached_requests
        _check(not held, f"the backend still holds state for {held} requests after they all ended")

    def check_seeded_sampling(self, shape: str = DEFAULT_SHAPE) -> None:
        """A seed fixes a request's sampled tokens, whatever runs beside it; other seeds give other tokens."""
        from ernie_serve.core.sampling_params import SamplingParams

        llm = self.llm(shape)
        prompt = {"prompt_token_ids": PROMPTS[1]}

        def params(seed: int) -> SamplingParams:
            return SamplingParams(temperature=1.5, top_p=0.95, seed=seed, max_tokens=12, ignore_eos=True)

        first = llm.generate(prompt, params(1234))[0].outputs[0].token_ids
        again = llm.generate(prompt, params(1234))[0].outputs[0].token_ids
        _check(first == again, f"same seed, different tokens: {first} vs {again}")
        neighbours = [{"prompt_token_ids": p} for p in (PROMPTS[0], PROMPTS[4])]
        unseeded = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
        mixed = llm.generate([neighbours[0], prompt, neighbours[1]], [unseeded, params(1234), unseeded])
        in_batch = mixed[1].outputs[0].token_ids
        _check(first == in_batch, f"seeded tokens changed with batch neighbours: {first} vs {in_batch}")
        others = {tuple(llm.generate(prompt, params(seed))[0].outputs[0].token_ids) for seed in (1, 2, 3, 4)}
        _check(len(others | {tuple(first)}) > 1, "five different seeds all sampled the same tokens")


def run_conformance(
    backend: str, workdir: str | Path | None = None, cases: Iterable[str] | None = None, **engine_settings: Any
) -> list[CaseResult]:
    """Run every case (or the named ones) for `backend`; returns the results when all pass, else raises
    `ConformanceError` naming each failed case."""
    suite = BackendConformance(backend, workdir, **engine_settings)
    try:
        results = suite.run_all(cases)
    finally:
        suite.close()
    failed = [r for r in results if not r.passed]
    if failed:
        raise ConformanceError(
            f"backend {backend!r} failed {len(failed)} of {len(results)} conformance cases:\n"
            + "\n".join(f"  {r.error}" for r in failed)
        )
    return results
