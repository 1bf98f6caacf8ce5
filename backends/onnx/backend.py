"""The ONNX Runtime backend: the exported graph (see `graph.py`), one KV cache per request kept on the host.

Each step, the plan's requests are grouped by how many tokens they compute (decodes together, prompt chunks of
similar length together) and each group is padded into one batch. A prompt group's `past_*` inputs are its
requests' caches copied into a staging buffer; a decode group's are the decode slots (`_DecodeSlots`), which keep
the decoding requests' past in the graph's layout from step to step. The graph's `new_*` outputs are appended to
each request's cache (and slot). Caches are
keyed by request id, started afresh on a request's `is_new` step and dropped by `release`. Block ids are not
used to address memory, only counted to bound it: a request's cache never grows beyond the blocks the block
manager gave it, so the pool size the engine chose still caps the backend's KV memory.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import structlog
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from ernie_serve.backends.onnx.graph import (
    ATTENTION_BIAS,
    INPUT_IDS,
    LOGITS_INDEX,
    MASKED,
    POSITION_IDS,
    past_names,
)
from ernie_serve.core.backend import (
    Backend,
    BackendCapabilities,
    BackendConfigError,
    BackendOptions,
    BackendUnavailableError,
    KVCacheSpec,
)
from ernie_serve.ort_contrib import inference_session
from ernie_serve.quantization import QuantSpec

if TYPE_CHECKING:
    import torch

    from ernie_serve.core.config import EngineSettings, ModelConfig
    from ernie_serve.core.plan import ScheduledRequest, StepPlan

log = structlog.get_logger("ernie_serve.onnx")

# Short names accepted by --onnx-providers, besides onnxruntime's full provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
# A group of requests batched into one run may compute at most this factor more token rows than it needs.
MAX_PADDING = 1.25
# Decode slots (`_DecodeSlots`) size their past axis in multiples of this many positions, so what is staged
# there stays in place for up to this many decode steps; the positions beyond a request's length are masked.
SLOT_POSITIONS = 64


class OnnxOptions(BackendOptions):
    """`--onnx-providers` / `ERNIE_SERVE_ONNX_PROVIDERS` / `LLM(onnx_providers=...)`, and so on."""

    onnx_providers: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="onnxruntime execution providers for --backend onnx, in priority order: cpu, cuda, tensorrt "
        "or full names (comma-separated)",
    )

    @field_validator("onnx_providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> list[str] | None:
        """Repeated flags, comma-separated strings (flag or env var) or a list: one flat list of names."""
        if value is None:
            return None
        items = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        return [p.strip() for item in items for p in str(item).split(",") if p.strip()] or None

    # Its own name: a flag belongs to one backend's options (the torch backend's is --quantize-lm-head).
    onnx_quantize_lm_head: bool = Field(
        True,
        description="onnx backend with --quantization: export the LM head quantized too (a quantized copy when "
        "the embeddings are tied); docs/quantization.md has the figures",
    )
    onnx_graph_flavour: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime",
        description="onnx backend: export and run this flavour of the graph; tensorrt is the graph the tensorrt "
        "backend builds its engine from (static-width MoE routing: every expert over every token, E/k times the "
        "expert FLOPs), run here to check it against the other backends; float32 only, no --quantization",
    )
    onnx_weight_only: bool = Field(
        False,
        description="onnx backend with --quantization: MatMulNBits computes in float32 with the dequantized "
        "weights (weight-only, several times slower) instead of rounding activations to int8 per block "
        "(wint8: its routed experts unrolled, since QMoE's 8-bit experts always round them)",
    )


def resolve_providers(requested: list[str] | None, device: str, available: list[str]) -> list[str]:
    """Execution providers in priority order, CPU always last as the fallback for unsupported nodes.

    `requested` (`OnnxOptions.onnx_providers`, already split at commas) takes full or short names. Without
    it, a CUDA device (or `auto` with a CUDA-capable onnxruntime) picks CUDA. A requested provider this
    onnxruntime lacks raises `BackendUnavailableError` saying what to install."""
    if not requested:
        wants_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        requested = ["CUDAExecutionProvider"] if wants_cuda else []
    providers = []
    for raw in requested:
        name = PROVIDER_ALIASES.get(raw.strip().lower(), raw.strip())
        if name not in available:
            hint = (
                "install onnxruntime-gpu (pip install onnxruntime-gpu) on a machine with an NVIDIA GPU"
                + (" and TensorRT" if name == "TensorrtExecutionProvider" else "")
                if name in _GPU_PROVIDERS
                else "install an onnxruntime build that includes it"
            )
            known = ", ".join(sorted(set(PROVIDER_ALIASES)))
            raise BackendUnavailableError(
                f"onnxruntime execution provider {name!r} is not available here (this onnxruntime has "
                f"{', '.join(available)}): {hint}; short names: {known}"
            )
        if name not in providers:
            providers.append(name)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return providers


@dataclass
class _Cache:
    """One request's keys and values, all layers: `data[layer, 0=key/1=value, K, capacity, D]`."""

    data: np.ndarray
    num_blocks: int  # KV blocks the block manager gave the request: they bound `capacity`
    length: int = 0  # positions filled

    def reserve(self, needed: int, limit: int) -> None:
        """Grow to hold `needed` positions: doubling (few copies), but never past `limit`, the positions
        the request's KV blocks cover, so the block manager's pool still bounds memory."""
        capacity = self.data.shape[3]
        if needed <= capacity:
            return
        if needed > limit:
            raise RuntimeError(f"KV cache needs {needed} positions but the request's blocks cover {limit}")
        grown = np.empty((*self.data.shape[:3], min(max(needed, 2 * capacity), limit), self.data.shape[4]), np.float32)
        grown[:, :, :, : self.length] = self.data[:, :, :, : self.length]
        self.data = grown


class _DecodeSlots:
    """The past KV of the requests that decode together, kept from step to step in the layout the graph reads:
    `data[layer, 0=key/1=value, slot, K, capacity, D]`, slot b holding request `ids[b]`'s first `lengths[b]`
    positions. A copy beside each request's own `_Cache`, which stays the source of truth.

    Staging every request's whole cache into a fresh batch each step (what prompt groups still do) cost about
    6 ms a step for 26 requests of 150 tokens on the CPU benchmark model, an eighth of a mixed workload's time.
    Here a decode step copies each request's newest position; a whole cache is copied only when its request
    joins the slots, and all of them when the layout changes (the past axis grows by `SLOT_POSITIONS`, or
    shrinks once the long requests have left). Slots 0..n-1 always hold exactly the step's requests, so the
    graph's `past_*` inputs are contiguous views of `data`.

    A layout change writes into a buffer an earlier layout used (`_relayout`), and both buffers stay when the
    last request leaves: memory the process has not written before costs far more to write than reused memory
    (a layout change on the CPU benchmark model's mixed workload took 100-300 ms into fresh pages here, 2-4 ms
    into reused ones). A buffer that must grow is allocated at twice the layout, so a workload's buffers stop
    growing after a few layouts. The price: the two buffers stay allocated, and the pages layouts wrote in
    them stay resident (after four rounds of that workload, buffers of 240 and 288 MB and 336 MB more resident
    memory than a fresh buffer per layout, which frees its pages when the requests end)."""

    def __init__(self) -> None:
        self.data = np.zeros((0, 2, 0, 0, 0, 0), np.float32)
        # the flat buffer `data` is a view of, and the spare the next layout is written into
        self._buffers = (np.zeros(0, np.float32), np.zeros(0, np.float32))
        self.ids: list[str] = []
        self.caches: list[_Cache] = []  # the cache each slot copies: a request started afresh has a new one
        self.lengths: list[int] = []

    def discard(self, request_ids: list[str]) -> None:
        """Free the slots of requests that ended; once no slot is held, the next step starts a new layout (in
        the buffers kept)."""
        for request_id in request_ids:
            if request_id in self.ids:
                self._remove(self.ids.index(request_id))
        if not self.ids:
            self.data = np.zeros((0, 2, 0, 0, 0, 0), np.float32)

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    def arrange(self, ids: list[str], caches: list[_Cache]) -> list[int]:
        """Make slots 0..len(ids)-1 hold exactly these requests with all their cached positions; returns the
        slot of each request, in the order given."""
        wanted = dict(zip(ids, caches, strict=True))
        slot = 0
        while slot < len(self.ids):  # requests not in this step (ended, or in a prompt group) leave
            if wanted.get(self.ids[slot]) is self.caches[slot]:
                slot += 1
            else:
                self._remove(slot)
        longest = max(cache.length for cache in caches)
        # room for every cached position and the one this step appends
        capacity = -(-(longest + 1) // SLOT_POSITIONS) * SLOT_POSITIONS
        slots = self.data.shape[2]
        if len(ids) > slots or capacity > self.capacity or 2 * capacity <= self.capacity:
            slots = slots if len(ids) <= slots else max(len(ids), 3 * slots // 2)
            self._relayout(caches[0].data.shape, capacity, slots)
        held = {request_id: b for b, request_id in enumerate(self.ids)}
        for request_id, cache in wanted.items():
            if request_id not in held:
                held[request_id] = len(self.ids)
                self.ids.append(request_id)
                self.caches.append(cache)
                self.lengths.append(0)
            b = held[request_id]
            if self.lengths[b] < cache.length:  # a new arrival, or a position a full slot could not take
                start = self.lengths[b]
                self.data[:, :, b, :, start : cache.length] = cache.data[:, :, :, start : cache.length]
                self.lengths[b] = cache.length
        return [held[request_id] for request_id in ids]

    def append(self, slot: int, new: np.ndarray) -> None:
        """Store one new position, `new` [L, 2, K, D], after the slot's last (the cache has it too)."""
        position = self.lengths[slot]
        if position < self.capacity:  # otherwise the next `arrange` copies it from the cache
            self.data[:, :, slot, :, position] = new
            self.lengths[slot] = position + 1

    def _remove(self, slot: int) -> None:
        """Free `slot` by moving the last slot's request into it."""
        last = len(self.ids) - 1
        if slot != last:
            n = self.lengths[last]
            self.data[:, :, slot, :, :n] = self.data[:, :, last, :, :n]
            self.ids[slot], self.caches[slot], self.lengths[slot] = self.ids[last], self.caches[last], n
        del self.ids[last], self.caches[last], self.lengths[last]

    def _relayout(self, cache_shape: tuple[int, ...], capacity: int, slots: int) -> None:
        """A layout of `slots` x `capacity` positions in the spare buffer (replaced by one twice the layout's
        size where too small), the held requests copied in; the buffers then swap roles. Positions beyond a
        request's length are masked, but must be finite (0 x inf would be NaN): the buffers start zeroed and
        only ever hold keys and values."""
        layers, _, kv_heads, _, head_dim = cache_shape
        shape = (layers, 2, slots, kv_heads, capacity, head_dim)
        current, spare = self._buffers
        size = int(np.prod(shape))
        if spare.size < size:
            spare = np.zeros(2 * size, np.float32)
        data = spare[:size].reshape(shape)
        for b, n in enumerate(self.lengths):  # each held request is one of the step's: n < capacity
            data[:, :, b, :, :n] = self.data[:, :, b, :, :n]
        self.data, self._buffers = data, (spare, current)


class OnnxBackend(Backend):
    name = "onnx"
    # Caches are per request, so a prefix-cache hit (a new request whose first tokens' KV lives in another
    # request's blocks) has nothing to read from: the scheduler must compute every prompt from position 0.
    # "cuda" through onnxruntime-gpu's CUDA and TensorRT providers; keys and values stay on the host.
    # --quantization: onnxruntime's contrib kernels, MatMulNBits (4 or 8 bits) and QMoE for routed experts; see
    # graph.py. Both have CPU kernels; on CUDA, onnxruntime falls back to CPU for any op its provider lacks.
    capabilities = BackendCapabilities(prefix_caching=False, quantization=("wint8", "wint4"), devices=("cpu", "cuda"))
    options_class = OnnxOptions

    def __init__(self) -> None:
        self.session: Any = None
        self.graph_path: Path | None = None
        self._caches: dict[str, _Cache] = {}
        self._buffer = np.zeros(0, np.float32)  # staging for a prompt group's past KV, see `_staging`
        self._slots = _DecodeSlots()  # the decoding requests' past KV, kept between steps
        self.block_size = 0

    @classmethod
    def availability(cls) -> str | None:
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed: pip install 'ernie-serve[onnx]'"
        return None

    def load(
        self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None, options: BackendOptions
    ) -> None:
        import onnxruntime as ort

        from ernie_serve.backends.onnx.export import ExportOptions, cached_export

        assert isinstance(options, OnnxOptions)
        if settings.dtype not in ("auto", "float32"):
            raise BackendConfigError(f"--dtype {settings.dtype}: the onnx backend's graph computes in float32")
        providers = resolve_providers(options.onnx_providers, settings.device, ort.get_available_providers())
        self.config = model_config
        export_options = ExportOptions(graph_flavour=options.onnx_graph_flavour)
        if settings.quantization and options.onnx_graph_flavour == "tensorrt":
            raise BackendConfigError(
                "--quantization with --onnx-graph-flavour tensorrt: the tensorrt graph has no quantized form "
                "(its quantized ops would be onnxruntime's own); drop one of the two"
            )
        if settings.quantization:
            spec = QuantSpec.of(settings.quantization, settings.quantization_group_size)
            export_options = ExportOptions(
                quantization=spec,
                quantize_lm_head=options.onnx_quantize_lm_head,
                weight_only=options.onnx_weight_only,
                # QMoE's layout is the CPU kernel's (probed on the CPU): other providers keep per-expert kernels
                fused_moe=None if providers == ["CPUExecutionProvider"] else False,
            )
            log.info(
                "quantized export",
                scheme=spec.describe(),
                lm_head=options.onnx_quantize_lm_head,
                weight_only=options.onnx_weight_only,
                # routed experts as one QMoE node per MoE layer (where a block fits both widths: docs/backends.md)
                qmoe=export_options.fused_moe,
            )
        export = cached_export(model_config, model_path, settings.seed, export_options)
        self.graph_path = export.path  # the model.onnx this backend runs
        self._weight_bytes = {kind: n for kind, n in export.weight_bytes.items() if n}
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.log_severity_level = 3  # warnings about unused constants etc. are not the user's concern
        # Idle worker threads sleep instead of spinning: between runs this thread copies caches and the engine
        # samples with torch, and spinning workers take the cores from both (measured on a shared 2-core
        # machine: twice the throughput).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # One thread knob for every backend: as many intra-op threads as torch uses (torch.set_num_threads,
        # OMP_NUM_THREADS; by default the physical cores, which is also onnxruntime's default).
        import torch

        session_options.intra_op_num_threads = torch.get_num_threads()
        self.session = inference_session(str(export.path), session_options, providers)
        self._output_names = [o.name for o in self.session.get_outputs()]
        log.info(
            "onnx session ready",
            path=str(export.path),
            cached_export=export.cached,
            export_seconds=round(export.seconds, 2),
            providers=self.session.get_providers(),
        )

    @property
    def weight_bytes(self) -> dict[str, int]:
        """The exported graph's weight bytes: `quantized` (codes and scales) and `full_precision` (float32)."""
        return dict(getattr(self, "_weight_bytes", {}))

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        # float32 keys and values on the host, whatever the execution provider
        return KVCacheSpec(bytes_per_token=2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        # Nothing to allocate up front: caches grow per request, within the blocks each one holds.
        self.block_size = block_size

    @property
    def num_cached_requests(self) -> int:
        """Requests whose KV the backend holds (read by the conformance suite: 0 once all ended)."""
        return len(self._caches)

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._caches.pop(request_id, None)
        self._slots.discard(request_ids)

    def execute(self, plan: StepPlan) -> torch.Tensor:
        import torch

        assert self.session is not None, "execute before load"
        for item in plan.scheduled:
            self._track(item)
        rows: dict[str, np.ndarray] = {}
        for group in self._groups(plan.scheduled):
            rows.update(self._run(group))
        ids = plan.sampling_request_ids
        if not ids:
            return torch.empty((0, self.config.vocab_size), dtype=torch.float32)
        return torch.from_numpy(np.stack([rows[i] for i in ids]))

    def _track(self, item: ScheduledRequest) -> None:
        """Start the request's cache afresh when it is new, else count its new blocks; check that the step
        continues exactly where the cache ends (a prefix-cache hit would not)."""
        if item.is_new:
            c = self.config
            shape = (c.num_hidden_layers, 2, c.num_key_value_heads, 0, c.head_dim)
            self._caches[item.request_id] = _Cache(np.empty(shape, np.float32), len(item.new_block_ids))
        elif item.request_id not in self._caches:
            raise RuntimeError(f"request {item.request_id!r} continues, but it was never new or was released")
        else:
            self._caches[item.request_id].num_blocks += len(item.new_block_ids)
        cache = self._caches[item.request_id]
        if item.start_position != cache.length:
            raise RuntimeError(
                f"request {item.request_id!r} continues at position {item.start_position}, but the onnx backend "
                f"holds {cache.length} positions for it: prefix caching must be off for this backend "
                "(--no-enable-prefix-caching)"
            )

    @staticmethod
    def _groups(items: list[ScheduledRequest]) -> list[list[ScheduledRequest]]:
        """Requests batched into one run each: longest first, a request joins the current group while the
        group's padded token rows stay within `MAX_PADDING` of the rows it really computes."""
        groups: list[list[ScheduledRequest]] = []
        real = 0
        for item in sorted(items, key=lambda it: len(it.token_ids), reverse=True):
            n = len(item.token_ids)
            if groups:
                group = groups[-1]
                longest = len(group[0].token_ids)
                if (len(group) + 1) * longest <= MAX_PADDING * (real + n):
                    group.append(item)
                    real += n
                    continue
            groups.append([item])
            real = n
        return groups

    def _run(self, group: list[ScheduledRequest]) -> dict[str, np.ndarray]:
        """One onnxruntime call for a padded batch; appends each request's new KV; returns the logits [V] of
        each request that samples."""
        c = self.config
        layers, kv_heads, head_dim = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        caches = [self._caches[item.request_id] for item in group]
        batch = len(group)
        seq = max(len(item.token_ids) for item in group)
        decoding = seq == 1  # one token each: the past comes from the decode slots, already staged
        if decoding:
            slots = self._slots.arrange([item.request_id for item in group], caches)
            order = sorted(range(batch), key=slots.__getitem__)  # batch row b is slot b
            group, caches = [group[i] for i in order], [caches[i] for i in order]
            past = self._slots.capacity
            kv = self._slots.data[:, :, :batch]
        else:
            past = max(cache.length for cache in caches)
            kv = self._staging((layers, 2, batch, kv_heads, past, head_dim))

        input_ids = np.zeros((batch, seq), np.int64)
        positions = np.zeros((batch, seq), np.int64)
        logits_index = np.zeros(batch, np.int64)
        # Keys 0..past-1 are cached positions (right-padded per request), keys past.. the new tokens; new
        # tokens are causal among themselves. A padding query row still sees itself, so nothing is NaN.
        bias = np.full((batch, seq, past + seq), MASKED, np.float32)
        bias[:, :, past:] = np.triu(np.full((seq, seq), MASKED, np.float32), k=1)
        for b, (item, cache) in enumerate(zip(group, caches, strict=True)):
            n, start = len(item.token_ids), cache.length
            input_ids[b, :n] = item.token_ids
            positions[b] = np.arange(start, start + seq)
            logits_index[b] = n - 1
            bias[b, :, :start] = 0.0
            if not decoding:
                kv[:, :, b, :, :start] = cache.data[:, :, :, :start]
        feed: dict[str, np.ndarray] = {
            INPUT_IDS: input_ids,
            POSITION_IDS: positions,
            ATTENTION_BIAS: bias,
            LOGITS_INDEX: logits_index,
        }
        for layer in range(layers):
            key_name, value_name = past_names(layer)
            feed[key_name], feed[value_name] = kv[layer, 0], kv[layer, 1]
        outputs = self.session.run(self._output_names, feed)
        new = np.stack(outputs[1:]).reshape(layers, 2, batch, kv_heads, seq, head_dim)
        for b, (item, cache) in enumerate(zip(group, caches, strict=True)):
            n, start = len(item.token_ids), cache.length
            cache.reserve(start + n, cache.num_blocks * self.block_size)
            cache.data[:, :, :, start : start + n] = new[:, :, b, :, :n]
            cache.length = start + n
            if decoding:
                self._slots.append(b, new[:, :, b, :, 0])
        return {item.request_id: outputs[0][b] for b, item in enumerate(group) if item.samples}

    def _staging(self, shape: tuple[int, ...]) -> np.ndarray:
        """A contiguous [L, 2, B, K, P, D] view of one reused buffer, for the batch's past keys and values.

        Not cleared between steps: padding positions keep whatever an earlier step left there, which is
        always finite (the buffer starts zeroed), and the attention bias gives them exactly zero weight.
        Reusing it avoids faulting in fresh pages for the whole batch cache every step."""
        size = int(np.prod(shape))
        if self._buffer.size < size:
            self._buffer = np.zeros(max(size, self._buffer.size * 3 // 2), np.float32)
        return self._buffer[:size].reshape(shape)

    def close(self) -> None:
        self._caches.clear()
        self._buffer = np.zeros(0, np.float32)
        self._slots = _DecodeSlots()
        self.session = None
