"""The backend interface: whatever runs the model (PyTorch, ONNX Runtime, TensorRT, a plugin's engine)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from ernie_serve.core.config import EngineSettings, ModelConfig
    from ernie_serve.core.plan import StepPlan


class BackendUnavailableError(RuntimeError):
    """The backend cannot run on this machine; the message says what to install or which hardware it needs."""


@dataclass(frozen=True)
class KVCacheSpec:
    """How much KV memory a token costs, so the engine can size the block pool."""

    bytes_per_token: int  # over all layers, keys and values
    device_free_bytes: int | None = None  # free accelerator memory after loading weights; None on CPU


class Backend(ABC):
    """Runs the model for a `StepPlan`. One instance per engine.

    Lifecycle: the engine calls `load` once, then `kv_cache_spec` to size the pool, then `allocate_kv_cache`
    with the block count it chose, then `execute` once per step, and finally `close`.
    """

    name: ClassVar[str] = ""
    # False for backends that keep one cache per request: the engine then turns prefix caching off, since a
    # prefix hit would point at KV held in another request's blocks.
    supports_prefix_caching: ClassVar[bool] = True

    @classmethod
    def availability(cls) -> str | None:
        """Called by `ernie-serve plugins` and before `load`: None when this backend can run here, else one
        line saying what to install or which hardware is missing. Must be cheap and must not raise."""
        return None

    @abstractmethod
    def load(self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None) -> None:
        """Called once at start-up: build the model and load weights (`model_path` None with dummy weights)."""

    @abstractmethod
    def kv_cache_spec(self) -> KVCacheSpec:
        """Called after `load`: the KV cost per token, used to turn a memory budget into a block count."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Called once after `kv_cache_spec`: allocate the pool the block tables in plans index into.
        Backends with their own cache layout may ignore block ids and key state by request id."""

    @abstractmethod
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Called once per engine step. Computes KV for every scheduled token and returns float32 logits
        `[len(plan.sampling_request_ids), vocab]`, one row per request with `samples=True`, in plan order.
        Must first drop state of `plan.finished_request_ids` / `preempted_request_ids`."""

    def release(self, request_ids: list[str]) -> None:  # noqa: B027 - optional hook
        """Called as soon as requests end (finished, stopped, aborted), so per-request state does not outlive
        them while the engine is idle. The ids also arrive in the next plan's `finished_request_ids` (and
        preempted ones in `preempted_request_ids`); releasing an unknown id must be a no-op."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called once when the engine shuts down: release memory, threads, devices."""


def unavailable_backend(name: str, reason: str) -> type[Backend]:
    """A stand-in to register when a backend's module cannot even be imported here (its package is missing):
    `ernie-serve plugins` lists it with `reason`, and selecting it fails with that line."""

    class UnavailableBackend(Backend):
        @classmethod
        def availability(cls) -> str | None:
            return reason

        def load(self, model_config, settings, model_path) -> None:  # type: ignore[no-untyped-def]
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")

        def kv_cache_spec(self) -> KVCacheSpec:
            raise BackendUnavailableError(reason)

        def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
            raise BackendUnavailableError(reason)

        def execute(self, plan):  # type: ignore[no-untyped-def]
            raise BackendUnavailableError(reason)

    UnavailableBackend.name = name
    UnavailableBackend.__qualname__ = UnavailableBackend.__name__ = f"Unavailable[{name}]"
    return UnavailableBackend
