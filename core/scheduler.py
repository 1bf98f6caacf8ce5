"""The scheduler interface and the built-in first-come-first-served scheduler.

Pure Python: importing this module must not import torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from ernie_serve.core.plan import StepPlan, StepResult
from ernie_serve.core.request import Request, RequestStatus


class Scheduler(ABC):
    """Decides which requests compute which tokens each step.

    The engine calls `add_request` when a request arrives, `schedule` at the start of every step, hands the
    plan to the backend, then calls `update` with what was sampled; `abort_requests` between steps.
    """

    @abstractmethod
    def add_request(self, request: Request) -> None:
        """Called when a request arrives (already validated: it fits the context limit)."""

    @abstractmethod
    def abort_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Called between steps (client gone, stop string hit): finish these requests with `status`, free
        their blocks, and return the ones that were still unfinished."""

    @abstractmethod
    def schedule(self) -> StepPlan:
        """Called at the start of every step: pick requests and token counts within the budgets."""

    @abstractmethod
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Called after the backend ran `plan` and tokens were sampled: append tokens, advance
        `num_computed_tokens`, apply token-level stop conditions; return requests that finished this step."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool:
        """Called by the engine loop to decide whether to keep stepping."""
