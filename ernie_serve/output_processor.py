"""The output processor: the engine core's token outputs in, vLLM-shaped `RequestOutput`s out.

The one place where tokens become text for every caller (the offline `LLM` API, the async engine and so the
gateway): incremental detokenization, stop strings, logprob token texts, the `n` completions of a request,
and the request's metrics. Runs on the thread that steps the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from ernie_serve.core.engine_core import EngineCoreOutput
from ernie_serve.core.request import CompletionOutput, RequestOutput, RequestStatus, SampleLogprobs
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.detokenizer import IncrementalDetokenizer
from ernie_serve.tokenizer import Tokenizer

log = structlog.get_logger("ernie_serve.engine")


@dataclass
class _Completion:
    """The frontend's state of one of the `n` completions of a request."""

    index: int
    parent_id: str
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.output_text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class _Group:
    """One user request: its `n` completions, under the child request ids the engine core knows."""

    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    arrival_time: float
    first_token_time: float | None = None  # of any completion
    last_token_time: float | None = None  # of any completion
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # child id -> its final metrics


class OutputProcessor:
    """Turns `EngineCoreOutput`s into `RequestOutput`s; one per engine."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._completions: dict[str, _Completion] = {}  # child id -> state
        self._groups: dict[str, _Group] = {}  # user request id -> group
        self._touched: dict[str, None] = {}  # user request ids with news since the last `collect`, in order

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        children: list[tuple[str, SamplingParams]],
        arrival_time: float,
    ) -> None:
        """Called when the frontend adds a request, with the child ids and params of its `n` completions."""
        in_use = [i for i in (request_id, *(c for c, _ in children)) if i in self._groups or i in self._completions]
        if in_use:
            raise ValueError(f"request id {in_use[0]!r} is already in use")
        for index, (child_id, params) in enumerate(children):
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens,
            )
            want_logprobs = params.logprobs is not None
            self._completions[child_id] = _Completion(
                index, request_id, detokenizer, [], [] if want_logprobs else None, 0.0 if want_logprobs else None
            )
        self._groups[request_id] = _Group(prompt, list(prompt_token_ids), [c for c, _ in children], arrival_time)

    def forget(self, request_id: str) -> None:
        """Drop a request the engine core refused after `add_request` (it never ran)."""
        group = self._groups.pop(request_id, None)
        for child_id in group.child_ids if group else []:
            del self._completions[child_id]

    def child_ids(self, request_ids: Iterable[str]) -> list[str]:
        """The child ids of unfinished completions of these user requests (for an abort)."""
        return [
            child
            for rid in request_ids
            if rid in self._groups
            for child in self._groups[rid].child_ids
            if self._completions[child].finish_reason is None
        ]

    def has_pending_outputs(self) -> bool:
        """True while some request has news that `collect` has not returned yet (e.g. an abort)."""
        return bool(self._touched)

    def process(self, outputs: Iterable[EngineCoreOutput]) -> list[tuple[str, RequestStatus]]:
        """Apply one step's outputs. Returns the child ids that ended here while the engine core still runs
        them, with how: a stop string (stopped), or a failure turning their tokens into text (error). The
        caller finishes them in the core and passes the resulting outputs back here."""
        ended = []
        for out in outputs:
            completion = self._completions.get(out.request_id)
            if completion is None:
                continue
            group = self._groups[completion.parent_id]
            if out.metrics is not None:
                group.metrics[out.request_id] = out.metrics
            if out.token_time is not None:
                group.first_token_time = group.first_token_time or out.token_time
                group.last_token_time = out.token_time
            if completion.finish_reason is not None:
                continue  # already finished here (stop string): the core's own finish only brings metrics
            self._touched[completion.parent_id] = None
            try:
                hit = self._apply(completion, out)
            except Exception:  # a tokenizer or detokenizer fault fails this request only
                log.exception("turning tokens into text failed; the request ends with an error", id=out.request_id)
                completion.finish_reason, completion.stop_reason = "error", None
                if out.finish_reason is None:
                    ended.append((out.request_id, RequestStatus.FINISHED_ERROR))
                continue
            if hit is not None:
                # A stop string wins over whatever else ended the request on the same token (e.g. max_tokens).
                completion.finish_reason, completion.stop_reason = "stop", hit
                if out.finish_reason is None:
                    ended.append((out.request_id, RequestStatus.FINISHED_STOPPED))
            elif out.finish_reason is not None:
                completion.detokenizer.finish()
                completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
        return ended

    def _apply(self, completion: _Completion, out: EngineCoreOutput) -> str | None:
        """Add one output's tokens and logprobs to a completion; returns the stop string they complete."""
        if out.new_logprobs is not None and completion.logprobs is not None:
            for entry, token_id in zip(out.new_logprobs, out.new_token_ids, strict=True):
                for candidate_id, candidate in entry.items():
                    candidate.decoded_token = self.tokenizer.decode_token(candidate_id)
                completion.logprobs.append(entry)
                completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + entry[token_id].logprob
        completion.token_ids += out.new_token_ids
        return completion.detokenizer.add_tokens(out.new_token_ids) if out.new_token_ids else None

    def collect(self) -> list[RequestOutput]:
        """Cumulative outputs of every user request with news since the last call; a finished one comes back
        once with `finished=True` and is then forgotten."""
        results = []
        for parent_id in self._touched:
            group = self._groups[parent_id]
            completions = [self._completions[c].output() for c in group.child_ids]
            finished = all(c.finish_reason is not None for c in completions)
            results.append(
                RequestOutput(
                    request_id=parent_id,
                    prompt=group.prompt,
                    prompt_token_ids=group.prompt_token_ids,
                    outputs=completions,
                    finished=finished,
                    metrics=self._group_metrics(group) if finished else self._running_metrics(group),
                )
            )
            if finished:
                for child_id in group.child_ids:
                    del self._completions[child_id]
                del self._groups[parent_id]
        self._touched.clear()
        return results

    @staticmethod
    def _running_metrics(group: _Group) -> dict[str, float] | None:
        """While a request runs: its arrival and the times of its first and latest tokens, from which callers
        observe time to first token and inter-token latency."""
        if group.first_token_time is None or group.last_token_time is None:
            return None
        return {
            "arrival_time": group.arrival_time,
            "first_token_time": group.first_token_time,
            "last_token_time": group.last_token_time,
        }

    def _group_metrics(self, group: _Group) -> dict[str, float] | None:
        """The metrics of all `n` completions as one request: the prompt counted once."""
        if len(group.metrics) < len(group.child_ids):
            return None
        parts = [group.metrics[c] for c in group.child_ids]
        first = parts[0]
        return {**merge_metrics(parts), **{k: first[k] for k in ("num_prompt_tokens", "num_cached_tokens")}}


def merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of several engine requests served as one (the `n` completions of a request, the prompts of
    one completions call): from the earliest arrival to the last finish, token counts added up."""
    merged: dict[str, float] = {}
    for key in ("arrival_time", "first_scheduled_time", "first_token_time"):
        values = [p[key] for p in parts if key in p]
        if values:
            merged[key] = min(values)
    for key in ("last_token_time", "finished_time"):
        values = [p[key] for p in parts if key in p]
        if values:
            merged[key] = max(values)
    for key in ("num_cached_tokens", "num_prompt_tokens", "num_generation_tokens", "num_preemptions"):
        merged[key] = sum(p.get(key, 0.0) for p in parts)
    arrival = merged.get("arrival_time")
    if arrival is not None:
        for key, since in (("queue_time", "first_scheduled_time"), ("time_to_first_token", "first_token_time")):
            if since in merged:
                merged[key] = merged[since] - arrival
        if "finished_time" in merged:
            merged["e2e_latency"] = merged["finished_time"] - arrival
    # The gaps between a part's successive tokens add up to its last token time minus its first; a part that is
    # itself merged (a request of several completions) brings its mean, weighted by its gaps.
    weighted = [(_mean_gap(p), p["num_generation_tokens"] - 1) for p in parts if p["num_generation_tokens"] > 1]
    weighted = [(gap, steps) for gap, steps in weighted if gap is not None]
    if weighted:
        merged["mean_inter_token_latency"] = sum(g * n for g, n in weighted) / sum(n for _, n in weighted)
    return merged


def _mean_gap(part: dict[str, float]) -> float | None:
    if "mean_inter_token_latency" in part:
        return part["mean_inter_token_latency"]
    if "first_token_time" in part and "last_token_time" in part:
        return (part["last_token_time"] - part["first_token_time"]) / (part["num_generation_tokens"] - 1)
    return None
