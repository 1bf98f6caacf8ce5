"""Built-in schedulers, registered through the plugin manager exactly like a third-party plugin's."""

from __future__ import annotations

from ernie_serve.core.hookspecs import RegisterScheduler, hookimpl


@hookimpl
def register_schedulers(register: RegisterScheduler) -> None:
    """Called once when the plugin registry is built: registers the first-come-first-served and priority
    schedulers."""
    # Imported here so this module (and the plugin manager) load even while the scheduler module is broken;
    # a failure then skips this plugin with a logged reason instead of breaking `ernie-serve plugins`.
    from ernie_serve.core.scheduler import FCFSScheduler, PriorityScheduler

    register("fcfs", FCFSScheduler)
    register("priority", PriorityScheduler)
