"""Built-in schedulers, registered through the plugin manager exactly like a third-party plugin's: the
first-come-first-served scheduler of `ernie_serve.core.scheduler`, and a priority scheduler built on it the way
a plugin would (by overriding its policy hooks)."""

from __future__ import annotations

from ernie_serve.core.hookspecs import RegisterScheduler, hookimpl
from ernie_serve.core.request import Request
from ernie_serve.core.scheduler import FCFSScheduler


class PriorityScheduler(FCFSScheduler):
    """Lower `priority` runs first, ties by arrival. When blocks run out the worst running request (highest
    priority value, newest) is evicted, and a waiting request may evict a running one of worse priority."""

    def waiting_order_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)

    def preemption_victim(self) -> Request:
        return max(self.running, key=self.waiting_order_key)

    def admission_victim(self, request: Request) -> Request | None:
        if not self.running:
            return None
        victim = self.preemption_victim()
        return victim if self.waiting_order_key(victim) > self.waiting_order_key(request) else None


@hookimpl
def register_schedulers(register: RegisterScheduler) -> None:
    """Called once when the plugin registry is built: registers the first-come-first-served and priority
    schedulers."""
    register("fcfs", FCFSScheduler)
    register("priority", PriorityScheduler)
