"""Exporting a checkpoint to ONNX: into the on-disk cache for the backend, or into a directory for the
`ernie-serve export onnx` command.

The cache lives in `$ERNIE_SERVE_CACHE/onnx/<model_type>-<key>/` and the key hashes everything the graph
depends on: config.json, the weight files (their bytes when the checkpoint is at most
`CONTENT_HASH_LIMIT`; otherwise name, size, modification time and safetensors header, since reading gigabytes
at every start would cost more than it protects), the export options (with `--quantization`'s scheme, group
size and whether the LM head is quantized, so each quantized variant is an export of its own), the graph
version, the graph builder's source and the onnx version. A second start with the same checkpoint reuses the
export; a changed checkpoint exports again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from ernie_serve.backends.onnx import graph as graph_module
from ernie_serve.backends.onnx.graph import (
    GRAPH_VERSION,
    MS_DOMAIN,
    ONNXRUNTIME,
    OPSET,
    GraphQuantization,
    GraphStats,
    check_flavour,
    past_names,
)
from ernie_serve.ort_contrib import qmoe_router_weights_supported, qmoe_supported
from ernie_serve.quantization import QuantSpec

if TYPE_CHECKING:
    from ernie_serve.core.config import ModelConfig

log = structlog.get_logger("ernie_serve.onnx")

MODEL_FILE = "model.onnx"
INFO_FILE = "export.json"
CONTENT_HASH_LIMIT = 1 << 30  # checkpoints up to 1 GiB are keyed by their bytes (about a second to hash)


@dataclass(frozen=True)
class ExportOptions:
    """Everything besides the checkpoint that changes the exported graph (part of the cache key)."""

    # weights and activations: float32 for the onnxruntime flavour (CPU has no fast bf16); the tensorrt flavour
    # also takes bfloat16 and float16
    dtype: str = "float32"
    opset: int = OPSET
    quantization: QuantSpec | None = None  # `--quantization` and its group size (`QuantSpec.of`), or None
    quantize_lm_head: bool = True  # with `quantization`: the LM head quantized too
    # MatMulNBits at accuracy_level 0 (float32 activations) instead of 4; wint8's experts then unrolled, since
    # QMoE's 8-bit experts round their activations at every level
    weight_only: bool = False
    graph_flavour: str = ONNXRUNTIME  # "tensorrt": the graph TensorRT builds from (graph.py's docstring)
    # with `quantization`: each MoE layer's routed experts as one QMoE node (graph.py, `moe_qmoe`); None
    # resolves to whether the installed onnxruntime runs QMoE, so the key says which graph was built
    fused_moe: bool | None = None
    # with `fused_moe`: QMoE given ERNIE's choice and weights as they are (graph.py, `moe_qmoe`); None resolves
    # to whether the installed onnxruntime's QMoE takes them
    qmoe_router_weights: bool | None = None

    def __post_init__(self) -> None:
        if self.fused_moe is None:
            quant = self.quantization
            fused = quant is not None and self.graph_flavour == ONNXRUNTIME and qmoe_supported()
            fused = fused and not (self.weight_only and quant is not None and quant.bits == 8)
            object.__setattr__(self, "fused_moe", fused)
        if self.qmoe_router_weights is None:
            object.__setattr__(self, "qmoe_router_weights", bool(self.fused_moe) and qmoe_router_weights_supported())

    def graph_quantization(self) -> GraphQuantization | None:
        if self.quantization is None:
            return None
        return GraphQuantization(
            self.quantization,
            self.quantize_lm_head,
            accuracy_level=0 if self.weight_only else 4,
            fused_moe=bool(self.fused_moe),
            router_weights=bool(self.fused_moe and self.qmoe_router_weights),
        )


@dataclass
class ExportResult:
    path: Path  # the model.onnx file
    cached: bool  # True when an earlier export was reused
    seconds: float  # export time, or the time to find the cached one
    key: str
    weight_bytes: dict[str, int] = field(default_factory=dict)  # by kind: quantized, full_precision


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_header(path: Path) -> str:
    """The JSON header (tensor names, dtypes, shapes, offsets): cheap, and changes with any re-layout."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return hashlib.blake2b(f.read(min(size, 100 << 20)), digest_size=16).hexdigest()


def checkpoint_fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint's weights and config, as JSON-able data."""
    from ernie_serve.checkpoint import checkpoint_files

    path = Path(path)
    files = checkpoint_files(path)
    by_content = sum(f.stat().st_size for f in files) <= CONTENT_HASH_LIMIT
    entries = []
    for file in files:
        stat = file.stat()
        entry: dict[str, Any] = {"name": file.name, "size": stat.st_size}
        if by_content:
            entry["blake2b"] = _file_digest(file)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
            entry["header"] = _safetensors_header(file)
        entries.append(entry)
    return {"config": _file_digest(path / "config.json"), "weights": entries}


def export_key(
    model_config: ModelConfig, weights_path: str | None, seed: int, options: ExportOptions
) -> tuple[str, dict[str, Any]]:
    """(hex key, the material it hashes). Dummy weights (`weights_path` None) are keyed by config and seed."""
    import onnx

    if weights_path is None:
        source: dict[str, Any] = {"dummy": True, "seed": seed, "config": asdict(model_config) | {"extra": None}}
    else:
        source = checkpoint_fingerprint(weights_path)
    material = {
        "source": source,
        "options": asdict(options),
        "graph_version": GRAPH_VERSION,
        "graph_builder": _file_digest(Path(graph_module.__file__)),  # any edit of the builder re-exports
        "onnx": onnx.__version__,
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], material


def build_torch_model(model_config: ModelConfig, weights_path: str | None, seed: int, dtype: str = "float32"):
    """Our torch model on CPU, filled by the torch backend's loader, in float32 or bfloat16: the weights the
    export (`StreamedWeights`) must give the graph, for tests to compare with; the export itself never builds
    it."""
    import torch

    from ernie_serve.backends.torch.loader import init_dummy_weights, load_safetensors
    from ernie_serve.backends.torch.model import ErnieForCausalLM

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = ErnieForCausalLM(model_config, torch_dtype, torch.device("cpu")).eval()
    if weights_path is None:
        init_dummy_weights(model, seed)
    else:
        load_safetensors(model, weights_path)
    return model


class StreamedWeights(Mapping[str, Any]):
    """The checkpoint tensors the graph builder asks for, each made when asked: read by name from the
    checkpoint (only that tensor, or that part of a fused -Paddle tensor), or drawn as the torch backend's dummy
    weights of that name. The builder quantizes and writes each one to the data file before asking for the next,
    so an export holds one tensor (and the graph's nodes) at a time, never the model: a 21B-A3B checkpoint
    exports on a machine that could not hold it in float32. Use it as a context manager (it keeps the checkpoint's
    files open). Names, shapes and which tensors the checkpoint must hold are the torch model's
    (`checkpoint_targets`), taken from a copy on the meta device; a wrong checkpoint is refused from its
    headers before anything is read."""

    def __init__(self, model_config: ModelConfig, weights_path: str | None, seed: int) -> None:
        import torch

        from ernie_serve.backends.torch.model import ErnieForCausalLM
        from ernie_serve.checkpoint import CheckpointSlicer

        meta = ErnieForCausalLM(model_config, torch.float32, torch.device("meta"))
        self.shapes = {name: tuple(target.shape) for name, target in meta.checkpoint_targets()}
        self.seed = seed
        self.checkpoint = None if weights_path is None else CheckpointSlicer(weights_path, model_config)
        if self.checkpoint is None:
            return
        try:
            self.checkpoint.check(self.shapes)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Any:  # -> torch.Tensor, in the checkpoint's dtype and -PT orientation
        from ernie_serve.backends.torch.loader import dummy_tensor

        shape = self.shapes[name]
        if self.checkpoint is None:
            return dummy_tensor(name, shape, self.seed)
        return self.checkpoint.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __enter__(self) -> StreamedWeights:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the checkpoint's files (dummy weights have none)."""
        if self.checkpoint is not None:
            self.checkpoint.__exit__(None, None, None)


def export_to_dir(
    model_config: ModelConfig,
    weights_path: str | None,
    out_dir: str | Path,
    seed: int = 0,
    options: ExportOptions | None = None,
    check: bool = True,
) -> GraphStats:
    """Write model.onnx (+ model.onnx.data) for the checkpoint into `out_dir`; `check` runs onnx.checker."""
    import onnx

    from ernie_serve.backends.onnx.graph import save_graph

    options = options or ExportOptions()
    if options.opset != OPSET:
        raise ValueError(f"unsupported ONNX export options {options}: only opset {OPSET}")
    quant = options.graph_quantization()
    check_flavour(options.graph_flavour, options.dtype, quant)
    with StreamedWeights(model_config, weights_path, seed) as weights:
        stats = save_graph(model_config, weights, out_dir, MODEL_FILE, quant, options.graph_flavour, options.dtype)
    if check:
        onnx.checker.check_model(str(Path(out_dir) / MODEL_FILE))
    return stats


def cached_export(
    model_config: ModelConfig, weights_path: str | None, seed: int = 0, options: ExportOptions | None = None
) -> ExportResult:
    """The cached export of this checkpoint, made on first use. Safe against concurrent starts: each process
    exports into its own staging directory and the first rename wins."""
    from ernie_serve.demo import cache_root

    started = time.monotonic()
    options = options or ExportOptions()
    key, material = export_key(model_config, weights_path, seed, options)
    target = cache_root() / "onnx" / f"{model_config.model_type}-{key}"
    if (target / INFO_FILE).is_file():
        info = json.loads((target / INFO_FILE).read_text())
        return ExportResult(target / MODEL_FILE, True, time.monotonic() - started, key, info.get("weight_bytes", {}))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="export-", dir=target.parent))
    try:
        stats = export_to_dir(model_config, weights_path, staging, seed, options, check=False)
        info = {
            "key": key,
            "material": material,
            "source": weights_path,
            "nodes": stats.num_nodes,
            "parameters": stats.num_parameters,
            "weight_bytes": {"quantized": stats.quantized_bytes, "full_precision": stats.full_precision_bytes},
            "seconds": round(time.monotonic() - started, 3),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        try:
            staging.rename(target)
        except OSError:  # another process finished the same export first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info("onnx export written", path=str(target), nodes=stats.num_nodes, seconds=round(seconds, 2))
    weight_bytes = {"quantized": stats.quantized_bytes, "full_precision": stats.full_precision_bytes}
    return ExportResult(target / MODEL_FILE, False, seconds, key, weight_bytes)


# ----- the `ernie-serve export onnx` command -----


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024  # type: ignore[assignment]
    return ""


def _describe(model_config: ModelConfig) -> str:
    c = model_config
    text = f"{c.architecture}: {c.num_hidden_layers} layers, hidden {c.hidden_size}"
    if c.is_moe:
        moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        text += f", {moe_layers} MoE layers of {c.moe_num_experts} experts top-{c.moe_k}"
        if c.moe_num_shared_experts:
            text += f" + {c.moe_num_shared_experts} shared"
    return text


def export_command(
    model: str,
    output: str,
    load_format: str = "auto",
    seed: int = 0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    quantization: str | None = None,
    quantization_group_size: int = 128,
    quantize_lm_head: bool = True,
) -> int:
    """`ernie-serve export onnx --model PATH --output DIR [--quantization wint8|wint4 ...]`: export, check with
    onnx.checker, print a summary.

    `model` takes what `--model` takes (a checkpoint directory, "demo", or a preset with
    `load_format="dummy"`); `quantization` and `quantization_group_size` what the engine flags take (the
    graph the onnx backend caches for the same flags). Returns the exit code: 0, or 1 with one line on `err`
    for errors a user fixes.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    from ernie_serve.backends.onnx.backend import OnnxBackend

    missing = OnnxBackend.availability()
    if missing:
        err.write(f"ernie-serve: error: cannot export to ONNX: {missing}\n")
        return 1
    from ernie_serve.checkpoint import CheckpointError
    from ernie_serve.core.config import EngineSettings, ModelConfigError
    from ernie_serve.models import resolve_model

    started = time.monotonic()
    try:
        resolved = resolve_model(EngineSettings(model=model, load_format=load_format, seed=seed))
        spec = QuantSpec.of(quantization, quantization_group_size) if quantization else None
        options = ExportOptions(quantization=spec, quantize_lm_head=quantize_lm_head)
        out_dir = Path(output)
        if (out_dir / MODEL_FILE).exists():
            (out_dir / MODEL_FILE).unlink()  # never leave a stale graph beside new weights
        stats = export_to_dir(resolved.config, resolved.weights_path, out_dir, seed, options, check=True)
    except (ModelConfigError, CheckpointError, ValueError, OSError) as exc:
        err.write(f"ernie-serve: error: {exc}\n")
        return 1
    seconds = time.monotonic() - started
    c = resolved.config
    data = out_dir / f"{MODEL_FILE}.data"
    layers = c.num_hidden_layers
    kv = f"[batch, {c.num_key_value_heads}, past, {c.head_dim}]"
    last = f"_{layers - 1}" if layers > 1 else ""
    lines = [
        f"exported {model} ({_describe(c)}) to {out_dir}",
        f"  {MODEL_FILE:<16} {_size((out_dir / MODEL_FILE).stat().st_size):>10}  "
        f"{stats.num_nodes} nodes, opset {OPSET} + {MS_DOMAIN} (onnxruntime only)",
    ]
    if data.exists():
        kind = "float32" if spec is None else f"{spec.describe()}-quantized and float32"
        lines.append(
            f"  {data.name:<16} {_size(data.stat().st_size):>10}  external weights, "
            f"{stats.num_parameters:,} {kind} parameters"
        )
    if spec is not None:
        head = "quantized" if quantize_lm_head else "float32"
        lines.append(
            f"  weights: {_size(stats.quantized_bytes)} quantized, {_size(stats.full_precision_bytes)} float32 "
            f"(LM head {head})"
        )
    lines += [
        "  inputs:  input_ids [batch, seq], position_ids [batch, seq], attention_bias [batch, seq, past+seq],",
        f"           logits_index [batch], {past_names(0)[0]}..{past_names(layers - 1)[1]} {kv}",
        f"  outputs: logits [batch, {c.vocab_size}], new_key_0..new_value{last} "
        f"[batch, {c.num_key_value_heads}, seq, {c.head_dim}]",
        f"  onnx.checker: passed ({seconds:.1f} s in all)",
    ]
    out.write("\n".join(lines) + "\n")
    return 0
