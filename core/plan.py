"""What the scheduler hands the backend each step, and what comes back. Plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie_serve.core.request import Logprob


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]  # the new tokens whose KV this step computes, in order
    start_position: int  # position of token_ids[0] == tokens already in the cache
    # KV block ids appended to the request's block table this step; when `is_new`, the whole table (it holds
    # positions [0, start_position + len(token_ids))). Backends keep each request's table between steps.
    new_block_ids: list[int]
    is_new: bool  # first step since (re)admission: the backend starts this request's state afresh
    samples: bool  # True when this step reaches the last known token: the backend returns its logits


@dataclass
class StepPlan:
    """One engine step: every scheduled request, in the order the backend returns logits for them."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # lost their KV this step: the engine releases them before `execute` (backends read nothing here)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def sampling_request_ids(self) -> list[str]:
        """Row i of the backend's logits belongs to sampling_request_ids[i]."""
        return [s.request_id for s in self.scheduled if s.samples]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledToken:
    """The token sampled for one request this step, with its logprobs when asked for."""

    token_id: int
    logprobs: dict[int, Logprob] | None = None  # sampled token + top k


@dataclass
class StepResult:
    """What the engine passes back to `Scheduler.update` after sampling."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)  # request id -> its new token
