"""`ernie-serve bench scheduler`: the scheduler's own cost per step (schedule + update, no model) against the
number of running requests. It should grow at most linearly."""

from __future__ import annotations

import statistics
import time

from ernie_serve.core.plan import SampledToken, StepResult
from ernie_serve.core.request import Request
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.core.scheduler import FCFSScheduler, SchedulerConfig


def step_cost(num_running: int, steps: int = 50, prompt_len: int = 128, block_size: int = 16) -> float:
    """Median seconds of one `schedule()` + `update()` with `num_running` requests decoding."""
    blocks_per_request = -(-(prompt_len + steps + 8) // block_size)
    scheduler = FCFSScheduler(
        SchedulerConfig(
            max_num_seqs=num_running,
            max_num_batched_tokens=max(num_running, 1) * prompt_len,
            max_model_len=prompt_len + steps + 8,
            block_size=block_size,
            num_blocks=num_running * blocks_per_request,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(num_running):
        # distinct prompts, so prefix caching hashes every block but shares none
        scheduler.add_request(Request(f"r{i}", [i % 30000 + 3] + list(range(prompt_len - 1)), params))
    plan = scheduler.schedule()  # the prefill step, not timed
    scheduler.update(plan, StepResult({rid: SampledToken(7) for rid in plan.sampling_request_ids}))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        plan = scheduler.schedule()
        result = StepResult({rid: SampledToken(7) for rid in plan.sampling_request_ids})
        scheduler.update(plan, result)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(sizes: tuple[int, ...] = (1, 8, 32, 128, 512)) -> int:
    print(f"{'running':>8} {'us/step':>10} {'us/request':>11}")
    for n in sizes:
        cost = step_cost(n)
        print(f"{n:>8} {cost * 1e6:>10.1f} {cost * 1e6 / n:>11.2f}")
    return 0
