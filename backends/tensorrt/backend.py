"""The TensorRT backend: an engine built from the ONNX graph's TensorRT flavour, over ernie-serve's paged KV pool.

At `load`, the engine comes from the engine cache (`cache.py`) or is built (`build.py`: the graph is written to a
temporary directory, parsed, built with a prefill and a decode optimization profile, and cached). Each step, the
plan's requests are split into engine runs (`kv_plan.group_runs`); per run, torch gathers the sequences' past
keys and values from the paged pool into the engine's `past_*` inputs, the engine runs on torch's current CUDA
stream (`runtime.py`), and the `new_*` rows it returns are scattered into the new tokens' slots. Paging stays in
ernie-serve (block tables, preemption and prefix caching behave as with the torch backend); docs/backends.md gives
the per-step copy cost of this design.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
import torch
from pydantic import Field

from ernie_serve.backends.onnx.graph import (
    ATTENTION_BIAS,
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    POSITION_IDS,
    new_names,
    past_names,
)
from ernie_serve.backends.tensorrt import build, kv_plan, runtime
from ernie_serve.backends.tensorrt.cache import EngineCache, Profile, Target, engine_key, timing_cache_path
from ernie_serve.core.backend import (
    Backend,
    BackendCapabilities,
    BackendConfigError,
    BackendOptions,
    KVCacheSpec,
)
from ernie_serve.core.config import EngineSettings, ModelConfig
from ernie_serve.core.errors import BackendOutOfMemoryError
from ernie_serve.core.plan import ScheduledRequest, StepPlan

log = structlog.get_logger("ernie_serve.tensorrt")

INSTALL = "pip install 'ernie-serve[tensorrt]'"


class TensorRTOptions(BackendOptions):
    """`--tensorrt-cache-dir` / `ERNIE_SERVE_TENSORRT_CACHE_DIR` / `LLM(tensorrt_cache_dir=...)`, and so on."""

    tensorrt_cache_dir: str | None = Field(
        None,
        description="tensorrt backend: where built engines and the timing cache are kept (default: "
        "$ERNIE_SERVE_CACHE/tensorrt); `ernie-serve export tensorrt --output DIR` builds into such a directory",
    )
    tensorrt_workspace_gib: float = Field(
        8.0, gt=0, description="tensorrt backend: the builder's workspace memory limit in GiB"
    )


@functools.cache
def _tensorrt_import_error() -> str | None:
    """Why `import tensorrt` fails (e.g. the bindings wheel without its native libraries), or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, OSError from the native libraries: either means not usable
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_precision(requested: str, checkpoint_dtype: str) -> str:
    """The engine's precision: `--dtype`, else the checkpoint's half-precision dtype, else bfloat16."""
    if requested != "auto":
        return requested
    return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"


def context_limit(model_config: ModelConfig, settings: EngineSettings) -> int:
    """The longest context the engine's profiles cover: `--max-model-len`, capped by the model's, as the engine
    caps it before sizing the pool (a smaller pool may cap it further; the profiles then cover more)."""
    limit = model_config.max_position_embeddings
    return min(settings.max_model_len or limit, limit)


def engine_profiles(model_config: ModelConfig, settings: EngineSettings) -> list[Profile]:
    """The optimization profiles for these settings (index 0 prefill, 1 decode), from profiles.py."""
    from ernie_serve.backends.tensorrt.profiles import profiles

    return profiles(
        model_config, settings.max_num_batched_tokens, settings.max_num_seqs, context_limit(model_config, settings)
    )


def graph_key(model_config: ModelConfig, weights_path: str | None, seed: int, precision: str) -> str:
    """What identifies the graph's content: the ONNX export key (checkpoint, graph builder source and version,
    onnx version) of these weights, with the TensorRT flavour and precision."""
    from ernie_serve.backends.onnx.export import ExportOptions, export_key

    key, _ = export_key(model_config, weights_path, seed, ExportOptions(dtype=precision, graph_flavour="tensorrt"))
    return f"{key}-tensorrt-{precision}"


def current_target(trt: ModuleType, device: torch.device) -> Target:
    return Target(
        tensorrt_version=str(trt.__version__),
        gpu_name=torch.cuda.get_device_name(device),
        compute_capability=tuple(torch.cuda.get_device_capability(device)),  # type: ignore[arg-type]
        cuda_version=str(torch.version.cuda),
    )


@dataclass
class EngineResult:
    """An engine ready to run, and how it was obtained."""

    engine: Any  # trt.ICudaEngine
    path: Path  # the cached engine.plan
    cached: bool  # True when deserialized from the cache, False when built now
    seconds: float  # build (or load) time
    size: int  # serialized bytes


def cached_engine(
    trt: ModuleType, trt_runtime: Any, cache: EngineCache, build_engine: Callable[[], bytes], info: dict[str, Any]
) -> EngineResult:
    """The engine from `cache`, else built by `build_engine()` and stored with `info` (what describes it). A
    cached engine that does not deserialize (None or an exception) is a cache miss: it is rebuilt and replaced."""
    started = time.monotonic()
    blob = cache.read()
    if blob is not None:
        engine = build.deserialize(trt, trt_runtime, blob)
        if engine is not None:
            return EngineResult(engine, cache.engine_path, True, time.monotonic() - started, len(blob))
        log.warning("rebuilding the tensorrt engine: the cached one does not deserialize", path=str(cache.directory))
    blob = build_engine()
    seconds = time.monotonic() - started
    cache.write(blob, {**info, "build_seconds": round(seconds, 1), "bytes": len(blob)})
    engine = build.deserialize(trt, trt_runtime, blob)
    if engine is None:
        raise build.EngineBuildError("TensorRT could not deserialize the engine it just built")
    return EngineResult(engine, cache.engine_path, False, seconds, len(blob))


def obtain_engine(
    trt: ModuleType,
    trt_runtime: Any,
    logger: Any,
    model_config: ModelConfig,
    weights_path: str | None,
    seed: int,
    precision: str,
    profiles: Sequence[Profile],
    cache_dir: Path,
    workspace_bytes: int,
    device: torch.device,
) -> EngineResult:
    """Called by `load` and `ernie-serve export tensorrt`: the cached engine for this model, these settings and
    this GPU, built on a miss from the TensorRT-flavour graph written to a temporary directory."""
    target = current_target(trt, device)
    key, material = engine_key(graph_key(model_config, weights_path, seed, precision), target, profiles, precision)
    cache = EngineCache.at(cache_dir, model_config.model_type, key)

    def build_now() -> bytes:
        log.info("building a tensorrt engine (minutes for a large model)", key=key, precision=precision)
        with tempfile.TemporaryDirectory(prefix="ernie-serve-trt-") as scratch:
            onnx_path = build.write_graph(model_config, weights_path, seed, precision, Path(scratch))
            # warnings, not errors: the parser is the authority, and its own errors are reported in full
            for problem in build.lint_problems(onnx_path, profiles):
                log.warning("the graph may not suit TensorRT's ONNX parser", problem=problem)
            return build.build_engine(
                trt, logger, onnx_path, profiles, timing_cache_path(cache_dir, target), workspace_bytes
            )

    return cached_engine(trt, trt_runtime, cache, build_now, {"key": key, "material": material, "source": weights_path})


class TensorRTBackend(Backend):
    name = "tensorrt"
    # The pool is ernie-serve's paged pool, so prefix-cache hits read shared blocks like the torch backend's.
    capabilities = BackendCapabilities(prefix_caching=True, devices=("cuda",))
    options_class = TensorRTOptions

    def __init__(self) -> None:
        self.engine: Any = None
        self.contexts: list[Any] = []  # one execution context per optimization profile, set to it at load
        self.specs: dict[str, runtime.TensorSpec] = {}
        self.limits: list[kv_plan.ProfileLimits] = []  # per profile, from the engine's max shapes
        self.pool = torch.empty(0)  # [L, 2, slots, K, D] in the engine's KV dtype, see allocate_kv_cache
        self.block_size = 0
        self._tables: dict[str, list[int]] = {}  # each running request's block table, kept until `release`

    @classmethod
    def availability(cls) -> str | None:
        missing = [m for m in ("tensorrt", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed: {INSTALL} (on a machine with an NVIDIA GPU and driver)"
        broken = _tensorrt_import_error()
        if broken:
            return f"tensorrt is installed but does not import ({broken}): {INSTALL} with NVIDIA's native libraries"
        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch (no NVIDIA GPU or driver): TensorRT engines run on NVIDIA GPUs"
        return None

    def load(
        self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None, options: BackendOptions
    ) -> None:
        import tensorrt as trt

        from ernie_serve.demo import cache_root

        assert isinstance(options, TensorRTOptions)
        if settings.device not in ("auto", "cuda") and not settings.device.startswith("cuda:"):
            raise BackendConfigError(f"--device {settings.device}: the tensorrt backend runs on a CUDA GPU")
        self.device = torch.device("cuda" if settings.device == "auto" else settings.device)
        torch.cuda.set_device(self.device)
        self.config = model_config
        precision = resolve_precision(settings.dtype, model_config.dtype)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        cache_dir = Path(options.tensorrt_cache_dir) if options.tensorrt_cache_dir else cache_root() / "tensorrt"
        result = obtain_engine(
            trt,
            self.trt_runtime,
            self.logger,
            model_config,
            model_path,
            settings.seed,
            precision,
            engine_profiles(model_config, settings),
            cache_dir,
            int(options.tensorrt_workspace_gib * 2**30),
            self.device,
        )
        self.engine = result.engine
        self.specs = runtime.tensor_specs(trt, self.engine)
        self.limits = [profile_limits(self.specs, p) for p in range(self.engine.num_optimization_profiles)]
        stream = torch.cuda.current_stream(self.device)
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            if not context.set_optimization_profile_async(index, stream.cuda_stream):
                raise build.EngineBuildError(f"TensorRT refused optimization profile {index} for a context")
            self.contexts.append(context)
        stream.synchronize()
        self._weight_bytes = {"engine": result.size}
        log.info(
            "tensorrt engine ready",
            path=str(result.path),
            cached=result.cached,
            seconds=round(result.seconds, 1),
            engine_mib=round(result.size / 2**20, 1),
            precision=precision,
        )

    @property
    def weight_bytes(self) -> dict[str, int]:
        """The serialized engine's size (weights and kernels), as `engine`."""
        return dict(getattr(self, "_weight_bytes", {}))

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        itemsize = self.specs[past_names(0)[0]].dtype.itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        # Half the free memory is left for each step's gathered past (B x P positions, the same cost per token
        # as the pool) and the engine's activations; a step that still runs out is preempted by the engine.
        return KVCacheSpec(
            bytes_per_token=2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * itemsize,
            device_free_bytes=free // 2,
        )

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        self.block_size = block_size
        shape = (c.num_hidden_layers, 2, num_blocks * block_size, c.num_key_value_heads, c.head_dim)
        # Zeroed, unlike the torch backend's: padding past positions read kv_plan.PAD_SLOT, which may never be
        # written, and the attention bias zeroes their weight only if their values are finite.
        dtype = self.specs[past_names(0)[0]].dtype
        self.pool = torch.zeros(shape, dtype=dtype, device=self.device)  # [L, 2, slots, K, D]

    @property
    def num_cached_requests(self) -> int:
        return len(self._tables)

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._tables.pop(request_id, None)

    def _table(self, item: ScheduledRequest) -> list[int]:
        """The request's block table after this step's additions."""
        if item.is_new:
            self._tables[item.request_id] = list(item.new_block_ids)
        elif item.request_id not in self._tables:
            raise RuntimeError(f"request {item.request_id!r} continues, but it was never new or was released")
        else:
            self._tables[item.request_id] += item.new_block_ids
        return self._tables[item.request_id]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        assert self.engine is not None, "execute before load"
        items = plan.scheduled
        tables = [self._table(item) for item in items]
        runs = kv_plan.group_runs(
            [len(item.token_ids) for item in items], [item.start_position for item in items], *self.limits[:2]
        )
        rows: dict[str, torch.Tensor] = {}
        try:
            for run in runs:
                members = [items[i] for i in run.members]
                inputs = kv_plan.run_inputs(
                    [m.token_ids for m in members],
                    [m.start_position for m in members],
                    [tables[i] for i in run.members],
                    self.block_size,
                )
                logits = self._run(run.profile, inputs)  # [B, V]
                for b, member in enumerate(members):
                    if member.samples:
                        rows[member.request_id] = logits[b]
        except torch.OutOfMemoryError as exc:  # the engine preempts and retries with smaller steps
            raise BackendOutOfMemoryError(str(exc)) from exc
        ids = plan.sampling_request_ids
        if not ids:
            return torch.empty((0, self.config.vocab_size), dtype=torch.float32, device=self.device)
        return torch.stack([rows[i] for i in ids]).float()

    def run_tensors(
        self, inputs: kv_plan.RunInputs, past: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """The engine inputs and freshly allocated outputs of one run by tensor name, and the new K/V buffer
        `[L, 2, B, K, S, D]` whose slices are the `new_*` outputs. `past`: `kv_plan.gather_past`'s result."""
        c, device = self.config, self.pool.device
        feed = {
            INPUT_IDS: inputs.input_ids.to(device),
            POSITION_IDS: inputs.position_ids.to(device),
            ATTENTION_BIAS: inputs.attention_bias.to(device),
            LOGITS_INDEX: inputs.logits_index.to(device),
        }
        shape = (c.num_hidden_layers, 2, inputs.batch, c.num_key_value_heads, inputs.new, c.head_dim)
        new = torch.empty(shape, dtype=self.pool.dtype, device=device)  # [L, 2, B, K, S, D]
        logits = torch.empty((inputs.batch, c.vocab_size), dtype=self.specs[LOGITS].dtype, device=device)  # [B, V]
        outputs = {LOGITS: logits}
        for layer in range(c.num_hidden_layers):
            key, value = past_names(layer)
            feed[key], feed[value] = past[layer, 0], past[layer, 1]  # [B, K, P, D] each, contiguous slices
            key, value = new_names(layer)
            outputs[key], outputs[value] = new[layer, 0], new[layer, 1]  # [B, K, S, D] each
        return feed, outputs, new

    def _run(self, profile: int, inputs: kv_plan.RunInputs) -> torch.Tensor:
        """One engine run: gather, bind, execute on the current stream, scatter; returns its logits [B, V]."""
        past = kv_plan.gather_past(self.pool, inputs)  # [L, 2, B, K, P, D]
        feed, outputs, new = self.run_tensors(inputs, past)
        bound = runtime.bindings(self.specs, profile, feed, outputs)
        # Same stream as the gather before and the scatter after: ordered without a synchronization. Tensors
        # freed after this call return to torch's allocator for this stream, so no later kernel reuses them
        # before the engine is done with them.
        runtime.launch(self.contexts[profile], bound, torch.cuda.current_stream(self.device).cuda_stream)
        kv_plan.scatter_new(self.pool, new, inputs)
        return outputs[LOGITS]

    def close(self) -> None:
        self.contexts = []
        self.engine = None
        self.pool = torch.empty(0)
        self._tables.clear()


def profile_limits(specs: dict[str, runtime.TensorSpec], profile: int) -> kv_plan.ProfileLimits:
    """A profile's largest batch, new tokens and past, read from the engine's max shapes of `input_ids` [B, S]
    and `past_key_0` [B, K, P, D]."""
    _, _, (batch, new) = specs[INPUT_IDS].profile_shapes[profile]
    _, _, past_max = specs[past_names(0)[0]].profile_shapes[profile]
    return kv_plan.ProfileLimits(max_batch=batch, max_new=new, max_past=past_max[2])
