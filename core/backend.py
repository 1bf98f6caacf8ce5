"""The backend interface: whatever runs the model (PyTorch, ONNX Runtime, TensorRT, a plugin's engine)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic_settings import BaseSettings, SettingsConfigDict

from ernie_serve.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from ernie_serve.core.config import EngineSettings, ModelConfig
    from ernie_serve.core.plan import StepPlan


class BackendUnavailableError(UserError, RuntimeError):
    """The backend cannot run on this machine; the message says what to install or which hardware it needs."""


class BackendConfigError(UserError, ValueError):
    """Settings this backend cannot run with (e.g. a dtype it does not compute in); the message names the flag."""


@dataclass(frozen=True)
class KVCacheSpec:
    """How much KV memory a token costs, so the engine can size the block pool."""

    bytes_per_token: int  # over all layers, keys and values
    device_free_bytes: int | None = None  # free accelerator memory after loading weights; None on CPU


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do, declared on its class. Read by the engine before `load`: prefix caching is
    turned off without it, a `--quantization` scheme it does not list is refused, and a
    `--tensor-parallel-size` it does not implement is logged as having no effect. `devices` is informational: shown by
    `ernie-serve plugins`; the backend itself refuses a device it cannot use."""

    # False for backends that keep one cache per request: the engine then turns prefix caching off, since a
    # prefix hit would point at KV held in another request's blocks.
    prefix_caching: bool = True
    quantization: tuple[str, ...] = ()  # `--quantization` schemes it implements, e.g. ("wint8", "wint4")
    tensor_parallel: bool = False  # whether `--tensor-parallel-size` above 1 is implemented
    devices: tuple[str, ...] = ("cpu",)  # device kinds it runs on: "cpu", "cuda"


class BackendOptions(BaseSettings):
    """A backend's own settings. Subclass it with pydantic fields and set `Backend.options_class`: every field
    becomes a CLI flag (`--field-name`), an `ERNIE_SERVE_FIELD_NAME` environment variable and an `LLM(...)`
    keyword. The engine builds the instance from the values the user gave and passes it to `load`."""

    model_config = SettingsConfigDict(env_prefix="ERNIE_SERVE_", extra="forbid")


class Backend(ABC):
    """Runs the model for a `StepPlan`. One instance per engine.

    Lifecycle: the engine checks `availability` and `capabilities`, builds `options_class`, calls `load` once,
    then `kv_cache_spec` to size the pool, then `allocate_kv_cache` with the block count it chose, then
    `execute` once per step (with `release` between steps as requests end), and finally `close`.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities()
    options_class: ClassVar[type[BackendOptions]] = BackendOptions

    @classmethod
    def availability(cls) -> str | None:
        """Called by `ernie-serve plugins` and before `load`: None when this backend can run here, else one
        line saying what to install or which hardware is missing. Must be cheap and must not raise."""
        return None

    @abstractmethod
    def load(
        self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None, options: BackendOptions
    ) -> None:
        """Called once at start-up: build the model and load weights (`model_path` None with dummy weights).
        `options` is an instance of `options_class`."""

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
        A request's block table is sent whole on its `is_new` step and then only as `new_block_ids`: the
        backend keeps it (and any other per-request state) until `release`."""

    def release(self, request_ids: list[str]) -> None:  # noqa: B027 - optional hook
        """The one way per-request state ends. Called between steps, once for every request that ended
        (finished, stopped, aborted), and for the plan's `preempted_request_ids` before that plan's `execute`
        (they lost their KV; one may even be readmitted in the same plan, `is_new=True`). Releasing an unknown
        id must be a no-op; a backend must not drop state for any other reason."""

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Read by the engine once after `load`: resident weight bytes by kind (e.g. `quantized`,
        `full_precision`), logged and exported as a gauge. Empty when the backend does not count them."""
        return {}

    @property
    def num_cached_requests(self) -> int | None:
        """Optional: how many requests the backend holds per-request state for now (None: it does not count).
        The conformance suite checks it is 0 once every request has ended and been released."""
        return None

    def check_health(self) -> None:  # noqa: B027 - optional hook
        """Called every few seconds from the serving loop's watchdog, on another thread than `execute`'s, also
        while idle: raise when the backend can no longer serve (e.g. a worker process died). Must be cheap."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called once when the engine shuts down: release memory, threads, devices."""


def unavailable_backend(name: str, reason: str) -> type[Backend]:
    """A stand-in to register when a backend's module cannot even be imported here (its package is missing):
    `ernie-serve plugins` lists it with `reason`, and selecting it fails with that line."""

    class UnavailableBackend(Backend):
        @classmethod
        def availability(cls) -> str | None:
            return reason

        def load(self, model_config, settings, model_path, options) -> None:  # type: ignore[no-untyped-def]
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
