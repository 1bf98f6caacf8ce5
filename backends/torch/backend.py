"""The native PyTorch backend: our ERNIE 4.5 model over a paged KV cache."""

from __future__ import annotations

import logging
import resource
from typing import Literal

import structlog
import torch
from pydantic import Field

from ernie_serve.backends.torch import parallel
from ernie_serve.backends.torch.distributed import ParallelRuntime, RankEnv, torchrun_env
from ernie_serve.backends.torch.loader import init_dummy_weights, load_safetensors
from ernie_serve.backends.torch.malloc import HeapTrimmer
from ernie_serve.backends.torch.model import AttentionMetadata, DecodeGroup, ErnieForCausalLM, PrefillGroup
from ernie_serve.backends.torch.ort_kernels import AUTO_MIN_WEIGHTS, experts_run_as_qmoe, onnxruntime_available
from ernie_serve.backends.torch.quant import QuantizedWeight, onnxruntime_share
from ernie_serve.core.backend import (
    Backend,
    BackendCapabilities,
    BackendOptions,
    BackendUnavailableError,
    KVCacheSpec,
)
from ernie_serve.core.config import EngineSettings, ModelConfig
from ernie_serve.core.errors import BackendOutOfMemoryError, EngineFatalError
from ernie_serve.core.plan import StepPlan
from ernie_serve.core.plugins import get_model_class
from ernie_serve.quantization import QuantSpec

log = structlog.get_logger("ernie_serve.torch")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# On CPU, a batch of decoding requests attends in groups of similar context length, each padded to at most this
# many times its members' own blocks (`TorchBackend._decode_groups`). Measured on the CPU benchmark model's shapes, 26
# requests of 20-380 tokens: 1.5 and 2.0 gave 3 and 2 groups and the same time, 3.5 ms a layer, against 4.6 ms
# for a group per request and 4-16 ms for one batch (the machine was noisy that hour; every ordering held). That
# was with the rule's first form, which counted context positions instead of whole blocks (docs/backends.md).
DECODE_PADDING = 1.5


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"--device {requested}: no CUDA GPU is visible to torch")
    return device


def resolve_dtype(requested: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU unless asked otherwise (bf16 matmul there is hundreds of times slower); on GPU the
    checkpoint's dtype."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(checkpoint_dtype, torch.bfloat16)


class TorchOptions(BackendOptions):
    """`--cpu-weight-prepack` / `ERNIE_SERVE_CPU_WEIGHT_PREPACK` / `LLM(cpu_weight_prepack=...)`, and so on."""

    cpu_weight_prepack: bool = Field(
        True,
        description="torch backend on CPU: keep oneDNN-repacked copies of the weights for steps of several tokens "
        "(1.5-3x faster there; about twice the weight memory; quantized weights: see --int8-activations)",
    )
    int8_activations: bool = Field(
        False,
        description="torch backend with --quantization wint8 on CPU: multiply by fbgemm's int8 GEMM (a copy of "
        "the int8 weights), which also quantizes activations per call: W8A8-dynamic, not weight-only, faster, less "
        "accurate, and a request's result then depends on its batch; needs --cpu-weight-prepack",
    )
    exact_quantized_kernels: bool = Field(
        False,
        description="torch backend with --quantization on CPU: multiply quantized weights in float32 (fbgemm's row "
        "sums at one row, a dequantized copy per call above; exact with the dequantized weights, several times "
        "slower) instead of torch's weight-only int8/int4 kernels, which round activations to bfloat16",
    )
    cpu_quantized_kernels: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="torch backend with --quantization on CPU: whose int kernels multiply the quantized weights. "
        "onnxruntime: MatMulNBits for every matrix (2-3x torch's int4 kernel on large matrices; rounds activations "
        "to int8 per block of 128 or 64 inputs, like llama.cpp; needs `pip install 'ernie-serve[onnx]'`); torch: "
        "torch's int8/int4 kernels (activations rounded to bfloat16); auto: where onnxruntime is installed, "
        "onnxruntime's for every matrix of a MoE model whose routed experts (2M weights or more a layer) run as one "
        "QMoE session a layer, else for 4-bit matrices of 2M weights or more; torch's for the rest "
        "(docs/quantization.md)",
    )
    quantize_lm_head: bool = Field(
        True,
        description="torch backend with --quantization: store the LM head quantized too (a quantized copy when "
        "the embeddings are tied); docs/quantization.md has the speed and accuracy both ways",
    )
    cpu_malloc_trim_interval: float = Field(
        1.0,
        ge=0,
        description="torch backend on CPU with --cpu-weight-prepack: seconds between calls to glibc's malloc_trim "
        "after a step, which give the memory oneDNN's per-shape kernels free back to the OS (flat RSS in a "
        "long-running server, about 1% of its time); 0 never trims (docs/reliability.md, Soak)",
    )
    enable_expert_parallel: bool = Field(
        False,
        description="torch backend with --tensor-parallel-size N: split the routed experts by expert over the ranks "
        "(E/N whole experts each) instead of splitting every expert's width (docs/parallelism.md)",
    )


def cpu_quantized_kernels(requested: str) -> str:
    """`--cpu-quantized-kernels` resolved: "auto" (onnxruntime's for large 4-bit matrices) where onnxruntime is
    installed, else "torch"; "onnxruntime" (every quantized matrix) only where it is."""
    if requested == "auto":
        return "auto" if onnxruntime_available() else "torch"
    if requested == "onnxruntime" and not onnxruntime_available():
        raise BackendUnavailableError(
            "--cpu-quantized-kernels onnxruntime: onnxruntime is not installed (pip install 'ernie-serve[onnx]')"
        )
    return requested


def describe_cpu_kernels(options: TorchOptions, spec: QuantSpec, policy: str) -> str:
    """Which kernels multiply quantized weights on CPU, for the start-up log (as `prepare_for_inference`
    chooses them; `policy`: `--cpu-quantized-kernels` as `cpu_quantized_kernels` resolved it)."""
    if options.int8_activations and options.cpu_weight_prepack:
        return "fbgemm int8 GEMM for wint8 (W8A8-dynamic), exact float32 kernels for wint4"
    if options.exact_quantized_kernels or not options.cpu_weight_prepack:
        return "exact (float32 row sums / dequantized products)"
    torch_kernel = f"torch's {'int8' if spec.bits == 8 else 'int4'} kernel (activations bfloat16)"
    if policy == "onnxruntime":
        kernels = "onnxruntime MatMulNBits and QMoE (activations int8 per block)"
        if options.cpu_quantized_kernels == "auto":  # resolved so by `experts_run_as_qmoe`
            return f"{kernels}: auto, for a MoE model whose routed experts run as one QMoE session a layer"
        return kernels
    if policy == "auto" and spec.bits == 4:
        return (
            f"onnxruntime MatMulNBits (activations int8 per block) for matrices of {AUTO_MIN_WEIGHTS:,} weights "
            f"or more, {torch_kernel} below"
        )
    if spec.bits == 4 and options.cpu_quantized_kernels == "auto":
        return f"{torch_kernel}; pip install 'ernie-serve[onnx]' for onnxruntime's, 2-3x faster on large matrices"
    return torch_kernel


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TorchBackend(Backend):
    name = "torch"
    capabilities = BackendCapabilities(
        prefix_caching=True, quantization=("wint8", "wint4"), tensor_parallel=True, devices=("cpu", "cuda")
    )
    options_class = TorchOptions

    @classmethod
    def parallel_layout(cls) -> list[str]:
        """Read by `ernie-serve plugins` (optional for backends): how `--tensor-parallel-size N` splits the
        model over ranks, and what it would run on here. The start-up log gives the layout of a loaded model."""
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [
            "tensor parallel: rank 0 in the engine process, ranks 1..N-1 spawned on this host, or every rank "
            "started by torchrun across hosts; collectives over gloo on cpu, nccl on cuda "
            f"(here: cpu, {gpus} CUDA device{'s' if gpus != 1 else ''})",
            "split: q/k/v column-parallel and o_proj row-parallel by heads (KV heads split, or replicated when "
            "fewer than N), MLP and shared experts gate/up column / down row, embedding and LM head by vocab rows; "
            "routed experts by width, or by expert with --enable-expert-parallel",
        ]

    def __init__(self, rank_env: RankEnv | None = None) -> None:
        """`rank_env`: set for a tensor-parallel worker rank (backends/torch/distributed.py); the engine's
        backend is rank 0, or a torchrun rank read from the environment."""
        self.rank_env = rank_env
        # With --tensor-parallel-size above 1: this rank's connection to the others, and what it holds.
        self.runtime: ParallelRuntime | None = None
        self.layout: parallel.ParallelLayout | None = None
        self.rank_weight_bytes: dict[int, dict[str, int | str]] = {}  # per rank (rank 0: all): split/replicated
        self._released: list[str] = []  # released since the last step, sent to the workers with the next plan
        self.model: ErnieForCausalLM | None = None
        self.kv_caches: list[torch.Tensor] = []  # per layer, [N, 2, K, D]
        self.block_size = 0
        self._torch_threads_before: int | None = None  # set where onnxruntime's kernels took the cores
        # Each running request's block table, its block ids in order (a list: a step's index math is done in
        # Python ints, see `_prepare`): set whole on its `is_new` step, grown by `new_block_ids`, dropped by
        # `release`.
        self._tables: dict[str, list[int]] = {}
        self._heap_trimmer: HeapTrimmer | None = None  # set by `load` for oneDNN kernels on CPU

    def load(
        self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None, options: BackendOptions
    ) -> None:
        assert isinstance(options, TorchOptions)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, model_config.dtype, self.device)
        self.config = model_config
        if settings.tensor_parallel_size > 1:
            self._start_ranks(model_config, settings, model_path, options)
        elif options.enable_expert_parallel:
            log.warning("--enable-expert-parallel has no effect with --tensor-parallel-size 1")
        try:
            self._load(model_config, settings, model_path, options)
            if self.runtime is not None:
                self._report_ranks(model_config)
        except BaseException:
            if self.runtime is not None and self.runtime.rank == 0:
                self.runtime.abort()  # the workers stop too (one may be the cause)
            raise

    def _start_ranks(
        self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None, options: TorchOptions
    ) -> None:
        """Plan this rank's shard (refusing a checkpoint that does not split, before any worker starts), then
        join the other ranks: spawn them on this host, or meet them under torchrun."""
        world = settings.tensor_parallel_size
        env = self.rank_env or torchrun_env()
        if env is not None and env.world_size != world:
            raise parallel.ParallelConfigError(
                f"--tensor-parallel-size {world} but the launcher started {env.world_size} ranks (WORLD_SIZE): "
                "they must be equal"
            )
        rank = env.rank if env is not None else 0
        self.layout = parallel.ParallelLayout.plan(model_config, rank, world, options.enable_expert_parallel)
        if self.device.type == "cuda":  # one device per rank, numbered on each host
            self.device = torch.device("cuda", env.local_rank if env is not None else 0)
            torch.cuda.set_device(self.device)
        # A collective waits only for the other ranks to reach it, a small part of a step: one that waits half
        # the step timeout has a hung or dead rank, and failing then leaves time to name the rank before the
        # engine's step watchdog gives up on the whole step.
        timeout = settings.engine_step_timeout / 2
        if env is None:
            payload = {
                "model_config": model_config,
                "settings": settings,
                "model_path": model_path,
                "options": options,
                "threads": torch.get_num_threads(),  # a worker computes with as many threads as rank 0
                "log_level": logging.getLevelName(
                    logging.getLogger().getEffectiveLevel()
                ).lower(),  # and logs as rank 0 does
            }
            self.runtime = ParallelRuntime.start(world, payload, self.device, timeout)
        else:
            self.runtime = ParallelRuntime.join(env, self.device, timeout)
        self.config = self.layout.local_config(model_config)

    def _report_ranks(self, model_config: ModelConfig) -> None:
        """After loading: workers report their weight bytes; rank 0 waits for all of them and logs the layout."""
        assert self.runtime is not None and self.layout is not None and self.model is not None
        mine: dict[str, int | str] = {**parallel.split_weight_bytes(self.model), "device": str(self.device)}
        if self.runtime.rank:
            self.runtime.report_loaded(mine)
            return
        self.rank_weight_bytes = {0: mine, **self.runtime.wait_loaded()}
        log.info(
            "tensor-parallel layout",
            ranks=self.layout.world_size,
            launched_by="torchrun" if self.runtime.env.torchrun else "ernie-serve",
            devices=[self.rank_weight_bytes[r]["device"] for r in sorted(self.rank_weight_bytes)],
            worker_pids={r: p.pid for r, p in self.runtime.workers.items()},  # spawned ones; none under torchrun
            **self.layout.describe(model_config),
        )

    def _load(
        self, model_config: ModelConfig, settings: EngineSettings, model_path: str | None, options: TorchOptions
    ) -> None:
        # the architecture is looked up in the plugin registry, so a plugin can register its own model class
        model_cls = get_model_class(model_config.architecture)
        quant = {}
        if settings.quantization:  # only then: a plugin model class need not take these keywords
            spec = QuantSpec.of(settings.quantization, settings.quantization_group_size)
            policy = cpu_quantized_kernels(options.cpu_quantized_kernels)
            if policy == "auto" and self.layout is None and experts_run_as_qmoe(self.config, spec):
                policy = "onnxruntime"  # every matrix: its experts run as one QMoE session a layer
            quant = {
                "quantization": spec,
                "quantize_lm_head": options.quantize_lm_head,
                "int8_activations": options.int8_activations and options.cpu_weight_prepack,
                "exact_quantized_kernels": options.exact_quantized_kernels,
                "cpu_quantized_kernels": policy,
            }
            log.info(
                "quantizing weights while loading",
                scheme=spec.describe(),
                lm_head=options.quantize_lm_head,
                cpu_kernels=describe_cpu_kernels(options, spec, policy) if self.device.type == "cpu" else None,
            )
        # quantized layers are built quantized and filled tensor by tensor: no full-precision copy ever exists
        self.model = model_cls(self.config, self.dtype, self.device, **quant).eval()
        if self.layout is not None:
            assert self.runtime is not None
            parallel.shard(self.model, self.layout, self.runtime.collectives)
            if model_path is None:
                parallel.init_dummy_shard(self.model, model_config, self.layout, settings.seed)
            else:
                parallel.load_shard(self.model, model_path, model_config, self.layout)
        elif model_path is None:
            init_dummy_weights(self.model, settings.seed)
        else:
            load_safetensors(self.model, model_path)
        if quant:
            self.model.quantize_tied_lm_head()
        self._weight_bytes: dict[str, int] = getattr(self.model, "weight_bytes", dict)()
        log.info(
            "weights loaded",
            **{f"{kind}_gib": round(n / 2**30, 3) for kind, n in self._weight_bytes.items()},
            peak_rss_gib=round(peak_rss_bytes() / 2**30, 2),
        )
        # optional for plugin model classes; ours copies weights for CPU kernels, which costs memory, or repacks
        # quantized ones in place for torch's CUDA kernels
        on_cuda = self.device.type == "cuda"
        wanted = options.cpu_weight_prepack or on_cuda
        prepare = getattr(self.model, "prepare_for_inference", None) if wanted else None
        extra_bytes = prepare() if prepare is not None else 0
        if quant:
            self._weight_bytes = getattr(self.model, "weight_bytes", dict)()  # repacked codes may replace row-wise ones
            if not on_cuda:
                self._hand_cores_to_onnxruntime(quant["cpu_quantized_kernels"])
        if extra_bytes:
            self._weight_bytes["kernel_copies"] = extra_bytes
            log.info("weights prepared for CPU kernels", extra_gib=round(extra_bytes / 2**30, 2))
            if options.cpu_malloc_trim_interval > 0:
                # oneDNN's per-shape primitives would otherwise leave freed memory in the heap (malloc.py)
                self._heap_trimmer = HeapTrimmer(options.cpu_malloc_trim_interval)

    def _hand_cores_to_onnxruntime(self, policy: str) -> None:
        """Where onnxruntime's kernels hold most quantized weights (`onnxruntime_share`, the rule by which
        `prepare_for_inference` gave their sessions the process-wide pool), torch's own ops (attention, norms,
        routing: small next to the products) run on one thread. torch's OpenMP workers spin-wait after each
        parallel region and took the core onnxruntime's worker needed: measured on the 21B-A3B's shapes, decode
        ran 1.3x faster with torch on one thread and each onnxruntime session on two than with both on two.
        `close` gives torch its threads back."""
        weights = [m for m in self.model.modules() if isinstance(m, QuantizedWeight)]
        if not any(w.onnxruntime_bytes() for w in weights):  # exact or fbgemm kernels: nothing was packed
            return
        share = onnxruntime_share(weights, policy)
        if share >= 0.5 and torch.get_num_threads() > 1:
            log.info(
                "onnxruntime kernels hold most quantized weights: they share one spinning thread pool, and "
                "torch's own ops run on one thread",
                onnxruntime_share=round(share, 3),
                onnxruntime_threads=torch.get_num_threads(),
            )
            self._torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(1)

    def check_health(self) -> None:
        """A spawned tensor-parallel worker that ended unasked (seen by its watcher thread) ends serving, also
        while idle; one that hangs is found by the next step's collective timeout."""
        if self.runtime is not None and self.runtime.failed is not None:
            raise RuntimeError(self.runtime.failed)

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes: `quantized`, `full_precision`, and `kernel_copies` (the prepacked copies)."""
        return dict(getattr(self, "_weight_bytes", {}))

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize
        free = None
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        return KVCacheSpec(bytes_per_token=per_token, device_free_bytes=free)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        if self.runtime is not None and self.runtime.rank == 0:
            self.runtime.send(("allocate", num_blocks, block_size), wait_for_ack=True)
        c = self.config  # under tensor parallelism, this rank's KV heads only
        # [N, 2, K, D]: a slot's key and value side by side, so a step writes both with one copy and attention
        # gathers both with one (on the CPU each torch call costs more than the copy it makes)
        shape = (num_blocks * block_size, 2, c.num_key_value_heads, c.head_dim)
        self.block_size = block_size
        # Uninitialized on purpose (no page is touched until used): a block is zeroed when its first slot is
        # written (see `_prepare`), so attention never reads uninitialized memory.
        self.kv_caches = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]

    def execute(self, plan: StepPlan) -> torch.Tensor:
        runtime = self.runtime
        if runtime is None or runtime.rank:
            return self._execute(plan)
        # Rank 0: every rank runs the same plan. Any failure now may leave the ranks in different collectives,
        # so it ends the engine (a supervisor restarts the server) rather than only this step's requests.
        try:
            runtime.send(("execute", plan, self._released))
            self._released = []
            return self._execute(plan)
        except Exception as exc:
            reason = runtime.diagnose()
            log.error("a tensor-parallel step failed", reason=reason, error=f"{type(exc).__name__}: {exc}")
            raise EngineFatalError(f"a tensor-parallel step failed: {reason}") from exc

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> torch.Tensor:
        assert self.model is not None, "execute before load"
        try:
            input_ids, positions, sample_rows, meta = self._prepare(plan)
            logits = self.model(input_ids, positions, self.kv_caches, meta, sample_rows)
            if self._heap_trimmer is not None:
                self._heap_trimmer.maybe_trim()
            return logits
        except torch.OutOfMemoryError as exc:  # CUDA: the engine preempts and retries with smaller steps
            raise BackendOutOfMemoryError(str(exc)) from exc
        except RuntimeError as exc:  # the CPU allocator's failure (where the OS refuses rather than kills)
            if "can't allocate memory" in str(exc):
                raise BackendOutOfMemoryError(str(exc)) from exc
            raise

    @property
    def num_cached_requests(self) -> int:
        """Requests whose block table the backend holds (read by the conformance suite: 0 once all ended)."""
        return len(self._tables)

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._tables.pop(request_id, None)
        if self.runtime is not None and self.runtime.rank == 0:
            self._released += request_ids

    def _table(self, request_id: str, new_block_ids: list[int], is_new: bool) -> list[int]:
        """The request's block table after this step's additions."""
        if is_new:
            self._tables[request_id] = list(new_block_ids)
        elif request_id not in self._tables:
            raise RuntimeError(f"request {request_id!r} continues, but it was never new or was released")
        elif new_block_ids:
            self._tables[request_id] += new_block_ids
        return self._tables[request_id]

    def _prepare(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the plan into token rows and attention metadata (all index math on the host, once, in Python
        ints: a single-request decode step costs a few small tensors, where torch's ops on tiny index tensors
        took 160 us a step, 2% of the CPU benchmark model's decode step)."""
        bs, device = self.block_size, self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        fresh: list[int] = []
        decode_lengths: list[int] = []
        prefills: list[PrefillGroup] = []
        for item in plan.scheduled:
            row = len(input_ids)
            n = len(item.token_ids)
            start, end = item.start_position, item.start_position + n
            table = self._table(item.request_id, item.new_block_ids, item.is_new)[: -(-end // bs)]  # holds 0..end
            input_ids += item.token_ids
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]  # the new tokens' slots only
            fresh += table[-(-start // bs) :]  # blocks whose slot 0 is written now
            if item.samples:
                sample_rows.append(row + n - 1)
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lengths.append(end)
            elif start == 0:
                prefills.append(PrefillGroup(row, n))
            else:
                query_pos = torch.arange(start, end)[:, None]
                mask = torch.arange(end)[None, :] <= query_pos  # [n, L]
                blocks = torch.tensor(table, device=device)
                prefills.append(PrefillGroup(row, n, blocks, end, mask.to(device)))
        rows = torch.tensor([input_ids, positions, slots], device=device)  # [3, T]: one tensor for the three
        meta = AttentionMetadata(slot_mapping=rows[2], block_size=bs, prefills=prefills)
        if fresh:
            meta.fresh_blocks = torch.tensor(fresh, device=device)
        if decode_rows:
            meta.decode_groups = self._decode_groups(decode_rows, decode_tables, decode_lengths)
        return rows[0], rows[1], torch.tensor(sample_rows, device=device, dtype=torch.long), meta

    def _decode_groups(self, rows: list[int], tables: list[list[int]], lengths: list[int]) -> list[DecodeGroup]:
        """The single-token requests (their rows, block tables and context lengths) in groups whose attention runs
        as one batch. On CPU, by context length: sorted, a group ends where the next request would make its
        padded slots more than `DECODE_PADDING` times the slots of its members' own blocks (a gather reads whole
        blocks, so requests of one length always share a group). One batch over every request pads each to
        the longest context (on the mixed workload 42% of the slots attention gathered and read were padding, 28%
        in groups, and attention took 40% of its decode steps there); a group per request pays a call each."""
        bs, device = self.block_size, self.device
        limit = DECODE_PADDING if device.type == "cpu" else float("inf")  # (on a GPU, padding costs less than calls)
        members: list[list[int]] = [[]]
        own = 0  # the group's members' own blocks
        for i in sorted(range(len(rows)), key=lambda i: lengths[i]):
            blocks = len(tables[i])  # request i is the group's longest: every member padded to its blocks
            if members[-1] and (len(members[-1]) + 1) * blocks > limit * (own + blocks):
                members.append([])
                own = 0
            members[-1].append(i)
            own += blocks
        groups = []
        for member in members:
            member.sort()  # in row order: one group of every decode row is the step's rows as they are
            group_rows = torch.tensor([rows[i] for i in member], device=device)
            if len(member) == 1:  # attention reads exactly its context: no mask
                ids = tables[member[0]]
                group = DecodeGroup(group_rows, torch.tensor([ids], device=device), context_len=lengths[member[0]])
                if ids[-1] - ids[0] == len(ids) - 1 and ids == list(range(ids[0], ids[-1] + 1)):
                    group.first_slot = ids[0] * bs
                groups.append(group)
                continue
            widest = max(len(tables[i]) for i in member)
            # pad with each request's own first block: always written, so masked reads are finite values
            padded = torch.tensor([tables[i] + tables[i][:1] * (widest - len(tables[i])) for i in member])
            context = torch.arange(widest * bs)[None, :] < torch.tensor([lengths[i] for i in member])[:, None]  # [B, L]
            # additive (0 / -inf) rather than boolean: CPU SDPA ran 1.5x faster with it at 40 requests
            mask = torch.zeros(context.shape, dtype=self.dtype).masked_fill_(~context, float("-inf"))
            groups.append(DecodeGroup(group_rows, padded.to(device), mask[:, None, None, :].to(device)))
        return groups

    def close(self) -> None:
        self.kv_caches = []
        self._tables.clear()
        self.model = None
        if self._torch_threads_before is not None:  # the process's other work gets its threads back
            torch.set_num_threads(self._torch_threads_before)
            self._torch_threads_before = None
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
