"""A scheduler plugin: shortest prompt first.

Admitting short prompts first lowers the mean time to first token when long and short prompts queue together;
the price is that a long prompt can wait while short ones keep arriving. Everything else (token budgets,
chunked prefill, prefix caching, preemption) is inherited from the built-in FCFS scheduler.
"""

from __future__ import annotations

from ernie_serve import FCFSScheduler, Request, hookimpl


class ShortestPromptFirstScheduler(FCFSScheduler):
    def waiting_order_key(self, request: Request) -> tuple:
        # Preempted requests keep their place by arrival among prompts of the same length.
        return (request.num_prompt_tokens, request.arrival_time)


@hookimpl
def register_schedulers(register) -> None:
    """Called once when ernie-serve builds its plugin registry."""
    register("shortest-first", ShortestPromptFirstScheduler)
