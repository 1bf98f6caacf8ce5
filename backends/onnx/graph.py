"""ERNIE 4.5 (dense and MoE) as an ONNX graph with a per-sequence KV cache, built node by node.

The weights come in by their HuggingFace checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...),
as the torch backend's loader fills them (`ErnieForCausalLM.checkpoint_targets()`): reading checkpoints
(shard index, dtype conversion, shape checks, dummy weights) exists once, and the graph depends on no torch
internals. The graph is written with `onnx.helper` rather than traced with `torch.onnx.export`: the
torch.export-based exporter needs about a minute for a 3-layer toy model (the data-dependent expert routing
makes it reason symbolically about every node), the TorchScript one is deprecated, and both add hundreds of
shape-plumbing nodes. Built by hand, the graph has only the ops it needs, a tiny model exports in a tenth of a
second, and it stays within what TensorRT's ONNX parser accepts.

With `--quantization` (`GraphQuantization`), the projections the torch backend quantizes (attention, dense MLPs,
routed and shared experts; the LM head unless turned off) are stored quantized with the shared math of
`ernie_serve.quantization` and multiplied by onnxruntime's contrib kernels (domain `com.microsoft`, as is RoPE's
`RotaryEmbedding` in every graph of this flavour, so it is for onnxruntime only; TensorRT builds from its own
flavour, below):
  wint4  `MatMulNBits` bits=4, accuracy_level=4: codes `q + 8` two per byte along K (low nibble first) in
         `[N, K/block, block/2]`, scales `[N * K/block]`, no zero-point input (its default is 8, our codes'
         offset: symmetric). block = the group size (64/128); one scale per output channel (group size -1)
         becomes block 128 with each row's one scale repeated over its blocks, which is the same weight
         (the op takes power-of-two blocks of 16 or more, not one block of K). accuracy_level=4 lets the kernel
         quantize the activations to int8 per block: not weight-only (docs/quantization.md has its accuracy);
         `--onnx-weight-only` exports accuracy_level=0 instead (float32 activations, slower).
  wint8  `MatMulNBits` bits=8, the same layout one code a byte (`q + 128`, `[N, K/128, 128]`), each row's
         one scale repeated over its blocks of 128. accuracy_level=4 rounds the activations to int8 per row
         and block, as for wint4: W8A8 per block. Not `DynamicQuantizeMatMul`, which rounds each call's whole
         input with one scale, so a request's logits moved with the rows batched beside it (by up to 1.4 on
         the CPU benchmark model; 2e-6 with `MatMulNBits`), and which was no faster where measured last
         (docs/quantization.md, "onnx backend").
  experts  each MoE layer's routed experts, either scheme, as one `QMoE` node (`moe_qmoe`) where onnxruntime
         runs it (export.py's `qmoe_supported`) and one block divides both widths (`qmoe_block`); otherwise each
         expert's two products are the kernels above (`moe_sparse`).

The TensorRT flavour (`flavour="tensorrt"`, the graph the TensorRT backend builds its engine from) is the same
model from the same builder, with four differences:
  rope     RoPE as plain Split/Mul/Sub/Add/Concat nodes (`rope`) instead of onnxruntime's `RotaryEmbedding`
           (`rope_fused`, 2 nodes a layer instead of 20: 10% of a one-token wint8 step on the CPU benchmark
           model); both rotate the same float32 angles;
  routing  no NonZero and no ScatterND: every routed expert runs over all T token rows and its output is
           weighted by its column of a dense [T, E] routing-weight matrix (zero for experts a token did not
           choose), built from TopK's ids with Equal against a constant arange and ReduceSum (no OneHot). Every
           shape in the graph then follows from the input shapes alone (a static routing width), which
           TensorRT's optimization profiles need. The cost: routed-expert FLOPs grow by E / k (64 / 6, about
           10.7x, on 21B-A3B); decode, bound by reading the expert weights, reads the same weights either way
           once a batch touches most experts.
  dtype    `dtype="bfloat16"/"float16"`: TensorRT 10+ networks are strongly typed, so precision is the tensors'
           dtype: weights, the residual stream, KV inputs and outputs are in `dtype`; where the torch backend
           computes in float32 the graph casts to float32 and back: RMSNorm statistics, RoPE, the router and its
           softmax, the routing weights, and attention's softmax (scores are cast to float32 before the float32
           `attention_bias` is added: MASKED does not fit in float16). Logits stay float32.
  quant    `--quantization` is refused: the quantized graph uses onnxruntime's contrib ops, which TensorRT's
           parser does not know (backends/tensorrt/lint.py checks the ops against the parser's list).
In float32 it runs in onnxruntime on CPU, which is how it is tested without TensorRT; onnxruntime's CPU kernels
have no bfloat16 arithmetic, so the tests run the bfloat16 graph in onnx's (slow, exact) reference evaluator.

Legend: B sequences in the batch, S new tokens per sequence (right-padded), P cached tokens per sequence
(right-padded), H hidden, Q query heads, K key/value heads, G = Q / K, D head dim, E routed experts, k experts
per token, I intermediate size, V vocab, T = B * S token rows, n tokens routed to one expert.

Inputs:
  input_ids        [B, S]       int64
  position_ids     [B, S]       int64
  attention_bias   [B, S, P+S]  float32  0 where query s may see key j (past 0..P-1, then the new tokens),
                                         `MASKED` elsewhere; the caller encodes causality and padding here
  logits_index     [B]          int64    the row in 0..S-1 whose next-token logits each sequence wants
  past_key_{i}     [B, K, P, D] float32  per layer i; P may be 0
  past_value_{i}   [B, K, P, D] float32
Outputs:
  logits           [B, V]       float32
  new_key_{i}      [B, K, S, D] float32  keys (after RoPE) of the S new tokens only: the caller appends them to
  new_value_{i}    [B, K, S, D] float32  each sequence's own cache (returning past + new would copy the whole
                                         cache out of the runtime every step); the graph's dtype in the
                                         TensorRT flavour, as are past_key/past_value
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ernie_serve.logging import progress
from ernie_serve.ort_contrib import MS_DOMAIN, external_tensor
from ernie_serve.quantization import (
    NBITS_PER_CHANNEL_BLOCK,
    QuantSpec,
    is_quantized_tensor,
    matmul_nbits_layout,
    qmoe_block,
    qmoe_layout,
    quantize,
)

if TYPE_CHECKING:
    import onnx

    from ernie_serve.core.config import ModelConfig

# Bump when the graph's math, inputs or outputs change: it is part of the export cache key.
GRAPH_VERSION = "3"
OPSET = 17  # ScatterND, GatherND batch_dims, TopK with a k input; ORT >= 1.12 and TensorRT >= 8.6 accept it
MASKED = -1e9  # finite, so a fully masked row softmaxes to finite values instead of NaN
# Tensors at least this large go to the external data file (small ones stay inline in model.onnx).
EXTERNAL_THRESHOLD = 1024
ONNXRUNTIME, TENSORRT = "onnxruntime", "tensorrt"  # graph flavours, see the module docstring
FLAVOURS = (ONNXRUNTIME, TENSORRT)
# Compute dtypes by name, as onnx.TensorProto's data types (onnx is imported lazily: the CLI runs without it).
FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16
DTYPES = {"float32": FLOAT, "float16": FLOAT16, "bfloat16": BFLOAT16}

INPUT_IDS, POSITION_IDS, ATTENTION_BIAS, LOGITS_INDEX, LOGITS = (
    "input_ids",
    "position_ids",
    "attention_bias",
    "logits_index",
    "logits",
)


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_{layer}", f"past_value_{layer}"


def new_names(layer: int) -> tuple[str, str]:
    return f"new_key_{layer}", f"new_value_{layer}"


def _np(tensor: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array as float32 numpy."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().to(device="cpu").float().numpy()
    return np.asarray(tensor, dtype=np.float32)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 `array` rounded to bfloat16 (nearest, ties to even, as torch's `.to(torch.bfloat16)`), as the
    uint16 bit patterns ONNX stores (numpy has no bfloat16). Weights are finite, so NaN needs no care."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def check_flavour(flavour: str, dtype: str, quant: GraphQuantization | None = None) -> None:
    """Raise ValueError, naming what is allowed, for a flavour/dtype/quantization the builder cannot emit."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown ONNX graph flavour {flavour!r}: {', '.join(FLAVOURS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown ONNX graph dtype {dtype!r}: {', '.join(DTYPES)}")
    if flavour == ONNXRUNTIME and dtype != "float32":
        raise ValueError(f"the onnxruntime graph computes in float32, not {dtype} (the tensorrt flavour takes a dtype)")
    if flavour == TENSORRT and quant is not None:
        raise ValueError(
            f"--quantization {quant.spec.describe()}: the tensorrt graph flavour has no quantized form (the "
            "quantized graph uses onnxruntime's contrib ops, which TensorRT's ONNX parser does not support)"
        )


@dataclass(frozen=True)
class GraphQuantization:
    """`--quantization` for the graph: the scheme and grouping, and whether the LM head is quantized too."""

    spec: QuantSpec
    lm_head: bool = True  # a tied head becomes a quantized copy; the embedding stays float32

    # MatMulNBits' accuracy_level: 4 lets it quantize activations to int8 per block (the fast kernels); 0
    # computes in float32 with the dequantized weights (exact, several times slower: for tests)
    accuracy_level: int = 4
    # Routed experts as one `QMoE` node per layer where the shapes allow (`qmoe_block`), instead of the
    # unrolled per-expert subgraphs; the exporter sets it only where onnxruntime runs QMoE (`qmoe_supported`)
    fused_moe: bool = False
    # QMoE given ERNIE's choice and weights as they are (its `router_weights` input) instead of masked logits;
    # the exporter sets it only where onnxruntime takes that input (`qmoe_router_weights_supported`)
    router_weights: bool = False

    def block_size(self) -> int:
        """MatMulNBits' block along K."""
        return self.spec.group_size or NBITS_PER_CHANNEL_BLOCK

    def matmul_nbits_attributes(self, k: int, n: int) -> dict[str, int]:
        bits, block, level = self.spec.bits, self.block_size(), self.accuracy_level
        return {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": level}


def matmul_nbits_inputs(weight: np.ndarray, quant: GraphQuantization) -> tuple[np.ndarray, np.ndarray]:
    """`weight` [N, K] as MatMulNBits' B (uint8 `[N, blocks, block * bits / 8]`) and scales (float32
    `[N * blocks]`): `matmul_nbits_layout`, which the torch backend's onnxruntime kernels share."""
    import torch

    codes, scales = quantize(torch.from_numpy(weight), quant.spec)  # [N, K] int8, [N, G] float32
    packed, block_scales, _ = matmul_nbits_layout(codes, scales, quant.spec)
    return packed.numpy(), block_scales.numpy()


def qmoe_expert_inputs(weight: np.ndarray, spec: QuantSpec, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert's float `weight` [N, K] quantized into QMoE's layout (`qmoe_layout`): codes uint8
    `[N, K * bits / 8]` and float32 scales `[N, K / block]`."""
    import torch

    codes, scales = quantize(torch.from_numpy(weight), spec)  # [N, K] int8, [N, G] float32
    packed, block_scales = qmoe_layout(codes, scales, spec, block)
    return packed.numpy(), block_scales.numpy()


@dataclass
class GraphStats:
    """What `build_graph` produced, for the export summary."""

    num_nodes: int = 0
    num_parameters: int = 0  # weights, quantized ones counted by their logical [N, K] elements
    external_bytes: int = 0
    quantized_bytes: int = 0  # codes and scales of the quantized weights
    full_precision_bytes: int = 0  # every unquantized weight (embeddings, norms, router, unquantized head)
    op_counts: Counter[str] = field(default_factory=Counter)


class _Builder:
    """Appends nodes and initializers; large initializers stream to an external data file as they come."""

    def __init__(self, data_file: BinaryIO | None, data_location: str) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.data_file, self.data_location = data_file, data_location
        self.stats = GraphStats()
        self._names: Counter[str] = Counter()

    def fresh(self, hint: str) -> str:
        self._names[hint] += 1
        return f"{hint}_{self._names[hint]}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs: Any):
        """Add one node; returns its output name (or a list of names when `outputs > 1`)."""
        outs = [name] if name and outputs == 1 else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        self.stats.op_counts[op_type] += 1
        return outs[0] if outputs == 1 else outs

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant (shape vectors, scalars), stored inline."""
        array = np.asarray(value, dtype=dtype)
        name = self.fresh("const")
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, array: np.ndarray, parameters: int | None = None, dtype: str = "float32") -> str:
        """A model weight: counted as a parameter, written to the external data file when large. float32
        (or `dtype`, a `DTYPES` name, rounded from float32), or, for quantized weights' codes, uint8
        (`parameters` then says how many weights it stands for, and the bytes count as quantized)."""
        from onnx import helper

        if dtype == "bfloat16" and array.dtype != np.uint8:
            return self._bfloat16_weight(name, array)
        stored = np.float16 if dtype == "float16" else np.float32
        array = np.ascontiguousarray(array, dtype=np.uint8 if array.dtype == np.uint8 else stored)
        if parameters is None:
            self.stats.num_parameters += array.size
            self.stats.full_precision_bytes += array.nbytes
        else:
            self.stats.num_parameters += parameters
            self.stats.quantized_bytes += array.nbytes
        if self.data_file is None or array.nbytes < EXTERNAL_THRESHOLD:
            self.initializers.append(self.numpy_helper.from_array(array, name))
            return name
        return self._external(name, array, helper.np_dtype_to_tensor_dtype(array.dtype))

    def _bfloat16_weight(self, name: str, array: np.ndarray) -> str:
        """`weight` in bfloat16: stored as raw bit patterns, which numpy_helper cannot make from numpy."""
        from onnx import TensorProto

        bits = bfloat16_bits(array)
        self.stats.num_parameters += bits.size
        self.stats.full_precision_bytes += bits.nbytes
        if self.data_file is None or bits.nbytes < EXTERNAL_THRESHOLD:
            proto = TensorProto(name=name, data_type=BFLOAT16, dims=bits.shape, raw_data=bits.tobytes())
            self.initializers.append(proto)
            return name
        return self._external(name, bits, BFLOAT16)

    def _external(self, name: str, array: np.ndarray, data_type: int) -> str:
        """Append `array`'s bytes to the data file at a page boundary; the initializer points there."""
        assert self.data_file is not None
        self.initializers.append(external_tensor(self.data_file, self.data_location, name, array, data_type))
        self.stats.external_bytes += array.nbytes
        return name


class _ErnieGraph:
    """Emits the forward pass layer by layer; initializer names follow the checkpoint's. `flavour` and `dtype`
    as `build_graph` takes them (in float32 every cast below is skipped, so the onnxruntime flavour's graph is
    exactly what it was before the TensorRT flavour existed)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, Any],
        b: _Builder,
        quant: GraphQuantization | None = None,
        flavour: str = ONNXRUNTIME,
        dtype: str = "float32",
    ) -> None:
        self.config, self.weights, self.b, self.quant = config, weights, b, quant
        self.flavour, self.dtype = flavour, dtype
        self.q_heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.axis_last = b.const([-1])
        # RoPE as onnxruntime's fused kernel (float32 only, onnxruntime only); the TensorRT flavour keeps `rope`
        self.fused_rope = flavour == ONNXRUNTIME

    def w(self, *names: str) -> np.ndarray:
        """Checkpoint tensors as float32 numpy, concatenated along the output rows when several (fusion)."""
        arrays = [_np(self.weights[name]) for name in names]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    def has(self, name: str) -> bool:
        return name in self.weights

    def wt(self, name: str, array: np.ndarray) -> str:
        """A weight the model computes with in the graph's dtype (router, correction bias and RoPE frequencies
        stay float32 and use `b.weight` directly)."""
        return self.b.weight(name, array, dtype=self.dtype)

    def to_float(self, x: str) -> str:
        """`x` in float32, for math the torch backend does in float32 whatever its dtype."""
        return x if self.dtype == "float32" else self.b.op("Cast", x, to=FLOAT)

    def to_dtype(self, x: str, name: str | None = None) -> str:
        """A float32 `x` back in the graph's dtype; with `name`, the result gets that name (a graph output)."""
        if self.dtype == "float32":
            return x if name is None else self.b.op("Identity", x, name=name)
        return self.b.op("Cast", x, to=DTYPES[self.dtype], name=name)

    # ----- building blocks -----
    def rmsnorm(self, x: str, weight: str) -> str:
        """`w * x / sqrt(mean(x^2) + eps)` in float32; this Pow/ReduceMean/Add/Sqrt/Div/Mul chain is the one
        onnxruntime fuses into SimplifiedLayerNormalization. `weight` is the checkpoint name."""
        b = self.b
        x = self.to_float(x)  # the statistics in float32, scaled by the weight in dtype, as the torch backend
        power = b.op("Pow", x, b.const(2.0, np.float32))
        mean = b.op("ReduceMean", power, axes=[-1], keepdims=1)
        denom = b.op("Sqrt", b.op("Add", mean, b.const(self.config.rms_norm_eps, np.float32)))
        return b.op("Mul", self.to_dtype(b.op("Div", x, denom)), self.wt(weight, self.w(weight)))

    def linear(self, x: str, name: str, *parts: str) -> str:
        """`x @ W^T + b` for checkpoint projections `{prefix}.{part}.weight` (several parts fused along the
        output), with W stored transposed ([in, out]) so MatMul reads it directly; bias when the checkpoint
        has one. `name` names the fused initializer."""
        b = self.b
        weight = self.w(*(f"{p}.weight" for p in parts))  # [out, in]
        if self.quant is not None and is_quantized_tensor(f"{parts[0]}.weight"):
            y = self.quantized_matmul(x, name, weight)
        else:
            y = b.op("MatMul", x, self.wt(f"{name}.weight", weight.T))
        if self.has(f"{parts[0]}.bias"):
            y = b.op("Add", y, self.wt(f"{name}.bias", self.w(*(f"{p}.bias" for p in parts))))
        return y

    def quantized_matmul(self, x: str, name: str, weight: np.ndarray) -> str:
        """`x @ W^T` [.., K] -> [.., N] with `weight` [N, K] stored quantized (see the module docstring).
        Rows are quantized independently, so quantizing a fused weight equals quantizing its parts."""
        assert self.quant is not None
        b, quant = self.b, self.quant
        n, k = weight.shape
        packed, scales = matmul_nbits_inputs(weight, quant)
        inputs = [
            b.weight(f"{name}.qweight", packed, parameters=n * k),  # [N, blocks, block * bits / 8]
            b.weight(f"{name}.scales", scales, parameters=0),  # [N * blocks]
        ]
        return b.op("MatMulNBits", x, *inputs, domain=MS_DOMAIN, **quant.matmul_nbits_attributes(k, n))

    def swiglu(self, x: str, prefix: str) -> str:
        """`down(silu(gate(x)) * up(x))` of the MLP at checkpoint `prefix`, gate and up fused in one MatMul.
        x [.., H] -> [.., H]."""
        b = self.b
        intermediate = self.weights[f"{prefix}.gate_proj.weight"].shape[0]
        gate_up = self.linear(x, f"{prefix}.gate_up_proj", f"{prefix}.gate_proj", f"{prefix}.up_proj")  # [.., 2I]
        gate, up = b.op("Split", gate_up, b.const([intermediate, intermediate]), axis=-1, outputs=2)
        hidden = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # [.., I]
        return self.linear(hidden, f"{prefix}.down_proj", f"{prefix}.down_proj")

    def rope(self, x: str) -> str:
        """Interleaved pairs (2i, 2i+1) rotate, GPT-J style. x [B, heads, S, D]; `rope_cos`/`rope_sin`
        [B, 1, S, D/2, 1] (made in `build`)."""
        cos, sin = self.rope_cos, self.rope_sin
        b = self.b
        pairs = b.op("Reshape", x, b.const([0, 0, 0, -1, 2]))  # [B, heads, S, D/2, 2]
        even, odd = b.op("Split", pairs, b.const([1, 1]), axis=-1, outputs=2)  # each [B, heads, S, D/2, 1]
        new_even = b.op("Sub", b.op("Mul", even, cos), b.op("Mul", odd, sin))
        new_odd = b.op("Add", b.op("Mul", odd, cos), b.op("Mul", even, sin))
        rotated = b.op("Concat", new_even, new_odd, axis=-1)
        return b.op("Reshape", rotated, b.const([0, 0, 0, -1]))  # [B, heads, S, D]

    def rope_fused(self, x: str, heads: int) -> str:
        """The same rotation as `rope`, as one onnxruntime `RotaryEmbedding` node. x [B, S, heads * D].

        Its cos/sin "caches" `rope_cos`/`rope_sin` are this step's own angles, [T, D/2] (computed once per run in
        `build`, exactly as `rope`'s), indexed by `rope_rows` 0..T-1: no table of every position ever served is
        stored."""
        return self.b.op(
            "RotaryEmbedding",
            x,
            self.rope_rows,
            self.rope_cos,
            self.rope_sin,
            domain=MS_DOMAIN,
            interleaved=1,
            num_heads=heads,
        )

    def heads(self, x: str, heads: int, name: str | None = None) -> str:
        """[B, S, heads * D] -> [B, heads, S, D]."""
        b = self.b
        split = b.op("Reshape", x, b.const([0, 0, heads, self.head_dim]))  # [B, S, heads, D]
        return b.op("Transpose", split, perm=[0, 2, 1, 3], name=name)

    # ----- layers -----
    def attention(self, i: int, x: str, bias: str) -> str:
        b = self.b
        q_heads, kv_heads, d = self.q_heads, self.kv_heads, self.head_dim
        name = f"model.layers.{i}.self_attn"
        qkv = self.linear(
            x, f"{name}.qkv_proj", f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"
        )  # [B, S, (Q+2K)D]
        q, k, v = b.op("Split", qkv, b.const([q_heads * d, kv_heads * d, kv_heads * d]), axis=-1, outputs=3)
        v_new, k_new = new_names(i)[1], new_names(i)[0]
        self.heads(v, kv_heads, name=v_new)  # [B, K, S, D]
        scale = b.const(d**-0.5, np.float32)
        if self.fused_rope:  # onnxruntime's RotaryEmbedding on [B, S, heads * D], before the heads move
            q = self.heads(b.op("Mul", self.rope_fused(q, q_heads), scale), q_heads)  # [B, Q, S, D]
            self.heads(self.rope_fused(k, kv_heads), kv_heads, name=k_new)  # [B, K, S, D]
        else:
            q, k = self.heads(q, q_heads), self.heads(k, kv_heads)  # [B, Q, S, D], [B, K, S, D]
            # RoPE in float32 (as the torch backend); q is scaled before the cast back: fewer elements than scores
            q = self.to_dtype(b.op("Mul", self.rope(self.to_float(q)), scale))
            self.to_dtype(self.rope(self.to_float(k)), name=k_new)
        past_k, past_v = past_names(i)
        # GQA without repeating KV: query head h uses KV head h // G, so the G query heads of one KV head are
        # G*S rows of one matrix, row g*S + s: [B, Q, S, D] -> [B, K, G*S, D].
        q = b.op("Reshape", q, b.const([0, kv_heads, -1, d]))
        # Past and new keys are scored separately and only the small score matrices are concatenated: the
        # cache is read in place, never copied into a [P+S] tensor. (onnxruntime folds each Transpose into
        # its MatMul.)
        scores_past = b.op("MatMul", q, b.op("Transpose", past_k, perm=[0, 1, 3, 2]))  # [B, K, G*S, P]
        scores_new = b.op("MatMul", q, b.op("Transpose", k_new, perm=[0, 1, 3, 2]))  # [B, K, G*S, S]
        scores = b.op("Concat", scores_past, scores_new, axis=-1)  # [B, K, G*S, P+S]
        scores = b.op("Add", self.to_float(scores), bias)  # float32: bias holds MASKED, beyond float16's range
        probs = self.to_dtype(b.op("Softmax", scores, axis=-1))
        probs_past, probs_new = b.op("Split", probs, self.split_ps, axis=-1, outputs=2)
        out = b.op("Add", b.op("MatMul", probs_past, past_v), b.op("MatMul", probs_new, v_new))  # [B, K, G*S, D]
        out = b.op("Reshape", out, b.const([0, q_heads, -1, d]))  # [B, Q, S, D]
        out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.const([0, 0, q_heads * d]))
        return self.linear(out, f"{name}.o_proj", f"{name}.o_proj")  # [B, S, H]

    def moe(self, i: int, x: str) -> str:
        """The MoE block of layer `i`: x [.., H] -> [T, H] (the caller reshapes it back)."""
        if self.flavour == TENSORRT:
            return self.moe_dense(i, x)
        c = self.config
        biased = self.has(f"model.layers.{i}.mlp.experts.0.gate_proj.bias")  # QMoE's bias inputs are not wired
        if self.quant is not None and self.quant.fused_moe and not biased:
            block = qmoe_block(self.quant.spec, c.hidden_size, c.moe_intermediate_size)
            if block is not None:
                return self.moe_qmoe(i, x, block)
        return self.moe_sparse(i, x)

    def route(self, rows: str, name: str) -> tuple[str, str, str]:
        """Router in float32 for rows [T, H]: (logits [T, E], probs [T, E], the top-k experts [T, k] int64).
        The correction bias only selects: probs are not biased."""
        logits, probs, selection = self.router_scores(rows, name)
        _, experts = self.b.op(
            "TopK", selection, self.b.const([self.config.moe_k]), axis=-1, largest=1, sorted=1, outputs=2
        )
        return logits, probs, experts

    def router_scores(self, rows: str, name: str) -> tuple[str, str, str]:
        """(logits [T, E], probs = softmax(logits), the scores that choose: probs + correction bias), float32."""
        b = self.b
        router_weight = b.weight(f"{name}.gate.weight", self.w(f"{name}.gate.weight").T)  # [H, E] float32
        logits = b.op("MatMul", self.to_float(rows), router_weight)  # [T, E]
        probs = b.op("Softmax", logits, axis=-1)
        bias_name = f"{name}.moe_statics.e_score_correction_bias"
        selection = b.op("Add", probs, b.weight(bias_name, self.w(bias_name).reshape(-1)))  # [T, E]
        return logits, probs, selection

    def moe_qmoe(self, i: int, x: str, block: int) -> str:
        """The routed experts of layer `i` as one onnxruntime `QMoE` node (quantized graphs), which runs each
        chosen expert on its own tokens inside the kernel: a few nodes per layer instead of `moe_sparse`'s
        13 per expert, most of which run on zero rows in a decode step.

        ERNIE selects by softmax + correction bias but weights by the unbiased softmax. Where QMoE takes
        `router_weights` (`GraphQuantization.router_weights`), it is given both as they are: it takes the top k
        of its router input and weights them by `router_weights` there, renormalized over the k. Otherwise QMoE
        routes by itself (softmax over its router input, top k, weights renormalized over the k), so the router
        input is the router's logits at the experts ERNIE chose (a `TopK`) and `MASKED` elsewhere: the softmax
        of that is each chosen expert's probability over the chosen ones' sum (the unchosen get exactly 0), its
        top k are the chosen experts, and the renormalized weights are ERNIE's. Either way, unless the chosen
        probabilities sum below `moe_norm_min`, 1e-12, whose floor QMoE does not apply. Experts are stacked
        `[E, ...]`, gate and up rows interleaved in one fc1 (`swiglu_fusion=1`: CPU QMoE's only fused layout),
        and the activation is `gate * sigmoid(alpha * gate) * (up + beta)` with alpha 1 and beta 0: SiLU(gate) *
        up.
        `accuracy_level` as for MatMulNBits (4: activations rounded to int8 per row and block; 8-bit experts
        always round them, so a weight-only wint8 export unrolls them instead: `ExportOptions`)."""
        assert self.quant is not None
        b, c, spec, name = self.b, self.config, self.quant.spec, f"model.layers.{i}.mlp"
        h, inter, num_experts = c.hidden_size, c.moe_intermediate_size, c.moe_num_experts
        rows = b.op("Reshape", x, b.const([-1, h]))  # [T, H]
        weights: list[str] = []
        if self.quant.router_weights:
            _, probs, router = self.router_scores(rows, name)  # [T, E] each: QMoE chooses by one, weights by the other
            weights = [""] * 7 + [probs]  # (no biases, fc3 or zero points: router_weights is input 14)
        else:
            logits, _, experts = self.route(rows, name)  # [T, E], [T, k]
            chosen = b.op("GatherElements", logits, experts, axis=1)  # [T, k]
            masked = b.op("Expand", b.const(MASKED, np.float32), b.op("Shape", logits))  # [T, E]
            router = b.op("ScatterElements", masked, experts, chosen, axis=1)  # [T, E]
        interleave = np.stack([np.arange(inter), inter + np.arange(inter)], 1).reshape(-1)  # gate_j, up_j, ...
        fc1_codes, fc1_scales, fc2_codes, fc2_scales = [], [], [], []
        for e in range(num_experts):
            prefix = f"{name}.experts.{e}"
            gate_up = self.w(f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight")[interleave]  # [2I, H]
            codes, scales = qmoe_expert_inputs(gate_up, spec, block)
            fc1_codes.append(codes)
            fc1_scales.append(scales)
            codes, scales = qmoe_expert_inputs(self.w(f"{prefix}.down_proj.weight"), spec, block)  # [H, I]
            fc2_codes.append(codes)
            fc2_scales.append(scales)
        fc1_weights = num_experts * 2 * inter * h
        inputs = [
            b.weight(f"{name}.experts.fc1.qweight", np.stack(fc1_codes), parameters=fc1_weights),  # [E, 2I, H*b/8]
            b.weight(f"{name}.experts.fc1.scales", np.stack(fc1_scales), parameters=0),  # [E, 2I, H / block]
            "",  # no fc1 bias
            b.weight(f"{name}.experts.fc2.qweight", np.stack(fc2_codes), parameters=num_experts * h * inter),
            b.weight(f"{name}.experts.fc2.scales", np.stack(fc2_scales), parameters=0),  # [E, H, I / block]
            *weights,
        ]
        out = b.op(
            "QMoE", rows, router, *inputs, domain=MS_DOMAIN, k=c.moe_k, activation_type="swiglu", swiglu_fusion=1,
            normalize_routing_weights=1, expert_weight_bits=spec.bits, block_size=block,
            accuracy_level=self.quant.accuracy_level, activation_alpha=1.0, activation_beta=0.0,
        )  # fmt: skip  # [T, H]
        if c.moe_num_shared_experts:
            out = b.op("Add", out, self.swiglu(rows, f"{name}.shared_experts"))
        return out

    def moe_sparse(self, i: int, x: str) -> str:
        """Route each token to its top-k experts and run each expert on its own tokens only (onnxruntime).

        Router (float32): probs = softmax(x Wr^T); experts = TopK(probs + bias) (the bias only selects);
        weights = probs at those experts, renormalized. Then, unrolled over the E experts (a fixed count, no
        Loop): Equal + NonZero list the (token, slot) pairs that chose expert e, Gather pulls those n token
        rows, the expert's two MatMuls run on [n, H], and ScatterND writes the n results into their (token,
        slot) rows of a [T, k, H] buffer. One weighted sum over k finishes the layer. Expert work is
        proportional to T * k, not T * E. Each (token, slot) is written by exactly one expert, so the scatter
        needs no `reduction`, which TensorRT's parser does not support; NonZero reads a float mask for the
        same reason (TensorRT's NonZero takes FP32/FP16 only).
        """
        from onnx import TensorProto

        b, c, name = self.b, self.config, f"model.layers.{i}.mlp"
        h = c.hidden_size
        rows = b.op("Reshape", x, b.const([-1, h]))  # [T, H]
        _, probs, experts = self.route(rows, name)
        weights = b.op("GatherElements", probs, experts, axis=1)  # [T, k]
        total = b.op("ReduceSum", weights, self.axis_last, keepdims=1)
        weights = b.op("Div", weights, b.op("Max", total, b.const(c.moe_norm_min, np.float32)))
        # Each (token, slot) pair is chosen once overall, so every expert writes disjoint rows of `slots`.
        shape = b.op("Concat", b.op("Shape", experts), b.const([h]), axis=0)  # [T, k, H]
        slots = b.op("ConstantOfShape", shape, value=b.numpy_helper.from_array(np.zeros(1, np.float32)))
        for e in range(c.moe_num_experts):
            chosen = b.op("Cast", b.op("Equal", experts, b.const(e)), to=TensorProto.FLOAT)  # [T, k]
            pairs = b.op("Transpose", b.op("NonZero", chosen), perm=[1, 0])  # [n, 2]: (token, slot)
            tokens = b.op("Gather", pairs, b.const(0), axis=1)  # [n]
            y = self.swiglu(b.op("Gather", rows, tokens, axis=0), f"{name}.experts.{e}")  # [n, H]
            slots = b.op("ScatterND", slots, pairs, y)
        weighted = b.op("Mul", slots, b.op("Unsqueeze", weights, self.axis_last))  # [T, k, H]
        out = b.op("ReduceSum", weighted, b.const([1]), keepdims=0)  # [T, H]
        if c.moe_num_shared_experts:
            out = b.op("Add", out, self.swiglu(rows, f"{name}.shared_experts"))
        return out

    def moe_dense(self, i: int, x: str) -> str:
        """The same routing with a static routing width (TensorRT): every expert runs over all T rows.

        The router's top-k ids become a dense [T, E] weight matrix: Equal against a constant arange marks each
        (token, slot, expert) [T, k, E], ReduceSum over the slots gives a 0/1 mask of the chosen experts, and
        the masked probabilities renormalized over the chosen ones are exactly the sparse path's weights, with
        zeros elsewhere (float32, like the torch backend's routing). Expert e's output [T, H] is scaled by its
        column and summed in expert order: an unchosen expert adds exact zeros. No NonZero, ScatterND or
        OneHot, and no shape depends on the routing. Costs E / k times the routed-expert FLOPs of the sparse
        path (see the module docstring); memory holds one expert's activations at a time plus the running sum.
        """
        from onnx import TensorProto

        b, c, name = self.b, self.config, f"model.layers.{i}.mlp"
        e = c.moe_num_experts
        rows = b.op("Reshape", x, b.const([-1, c.hidden_size]))  # [T, H]
        _, probs, experts = self.route(rows, name)  # [T, E], [T, k]
        slots = b.op("Unsqueeze", experts, self.axis_last)  # [T, k, 1]
        marks = b.op("Cast", b.op("Equal", slots, b.const(np.arange(e))), to=TensorProto.FLOAT)  # [T, k, E]
        chosen = b.op("ReduceSum", marks, b.const([1]), keepdims=0)  # [T, E] 1 where chosen, else 0
        weights = b.op("Mul", probs, chosen)  # [T, E]
        total = b.op("ReduceSum", weights, self.axis_last, keepdims=1)  # [T, 1]
        weights = self.to_dtype(b.op("Div", weights, b.op("Max", total, b.const(c.moe_norm_min, np.float32))))
        columns = b.op("Split", weights, b.const([1] * e), axis=1, outputs=e)  # E x [T, 1]
        columns = [columns] if e == 1 else columns
        out = None
        for expert, column in enumerate(columns):
            y = b.op("Mul", self.swiglu(rows, f"{name}.experts.{expert}"), column)  # [T, H]
            out = y if out is None else b.op("Add", out, y)  # a running sum: one expert's [T, H] alive at a time
        assert out is not None
        if c.moe_num_shared_experts:
            out = b.op("Add", out, self.swiglu(rows, f"{name}.shared_experts"))
        return out

    def build(self) -> tuple[list[Any], list[Any]]:
        """Emit every node; returns (graph inputs, graph outputs) value infos."""
        from onnx import TensorProto, helper

        b, c = self.b, self.config
        kd = [self.kv_heads, self.head_dim]
        kv_type = DTYPES[self.dtype]  # keys and values are stored as the model computes them
        inputs = [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(ATTENTION_BIAS, TensorProto.FLOAT, ["batch", "seq", "total"]),
            helper.make_tensor_value_info(LOGITS_INDEX, TensorProto.INT64, ["batch"]),
        ]
        outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", c.vocab_size])]
        for i in range(c.num_hidden_layers):
            for name in past_names(i):
                inputs.append(helper.make_tensor_value_info(name, kv_type, ["batch", kd[0], "past", kd[1]]))
            for name in new_names(i):
                outputs.append(helper.make_tensor_value_info(name, kv_type, ["batch", kd[0], "seq", kd[1]]))

        embed = self.wt("model.embed_tokens.weight", self.w("model.embed_tokens.weight"))  # [V, H]
        x = b.op("Gather", embed, INPUT_IDS, axis=0)  # [B, S, H]
        half = np.arange(self.head_dim // 2, dtype=np.float32)
        inv_freq = 1.0 / np.float32(c.rope_theta) ** (half * 2 / self.head_dim)  # [D/2], as the torch backend's
        inv_freq = b.weight("rope.inv_freq", inv_freq)
        positions = b.op("Unsqueeze", b.op("Cast", POSITION_IDS, to=TensorProto.FLOAT), self.axis_last)
        angles = b.op("Mul", positions, inv_freq)  # [B, S, D/2]
        if self.fused_rope:
            flat = b.op("Reshape", angles, b.const([-1, self.head_dim // 2]))  # [T, D/2]
            self.rope_cos, self.rope_sin = b.op("Cos", flat), b.op("Sin", flat)
            rows = b.op("Range", b.const(0), b.op("Size", POSITION_IDS), b.const(1))  # [T]: 0..T-1
            self.rope_rows = b.op("Reshape", rows, b.op("Shape", POSITION_IDS))  # [B, S]
        else:
            trig_axes = b.const([1, 4])
            self.rope_cos = b.op("Unsqueeze", b.op("Cos", angles), trig_axes)  # [B, 1, S, D/2, 1]
            self.rope_sin = b.op("Unsqueeze", b.op("Sin", angles), trig_axes)
        # Row g*S + s of every query group uses query s's mask: [B, S, P+S] -> [B, 1, G*S, P+S]
        groups = self.q_heads // self.kv_heads
        bias = b.op("Tile", b.op("Unsqueeze", ATTENTION_BIAS, b.const([1])), b.const([1, 1, groups, 1]))
        past_len = b.op("Shape", past_names(0)[0], start=2, end=3)  # [1]: P
        self.split_ps = b.op("Concat", past_len, b.op("Shape", INPUT_IDS, start=1, end=2), axis=0)  # [P, S]
        shape_bsh = b.op("Shape", x)
        # layer by layer: where the export's time goes, each layer's weights streamed to the data file
        for i in progress(range(c.num_hidden_layers), "exporting to ONNX", unit="layer"):
            prefix = f"model.layers.{i}"
            h = self.rmsnorm(x, f"{prefix}.input_layernorm.weight")
            x = b.op("Add", x, self.attention(i, h, bias))
            h = self.rmsnorm(x, f"{prefix}.post_attention_layernorm.weight")
            if c.is_moe_layer(i):
                y = b.op("Reshape", self.moe(i, h), shape_bsh)
            else:
                y = self.swiglu(h, f"{prefix}.mlp")
            x = b.op("Add", x, y)
        index = b.op("Unsqueeze", LOGITS_INDEX, self.axis_last)  # [B, 1]
        last = b.op("GatherND", x, index, batch_dims=1)  # [B, H]
        last = self.rmsnorm(last, "model.norm.weight")
        head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if self.quant is not None and self.quant.lm_head:  # a tied head: a quantized copy of the embedding
            b.op("Identity", self.quantized_matmul(last, "lm_head", self.w(head_name)), name=LOGITS)  # [B, V]
        else:
            head = embed if c.tie_word_embeddings else self.wt("lm_head.weight", self.w("lm_head.weight"))
            if self.dtype == "float32":
                b.op("Gemm", last, head, transB=1, name=LOGITS)  # [B, V]
            else:  # the head in dtype, its logits float32 (as the torch backend's `.float()`)
                b.op("Cast", b.op("Gemm", last, head, transB=1), to=FLOAT, name=LOGITS)  # [B, V]
        return inputs, outputs


def build_graph(
    config: ModelConfig,
    weights: Mapping[str, Any],
    data_file: BinaryIO | None = None,
    data_location: str = "",
    quant: GraphQuantization | None = None,
    flavour: str = ONNXRUNTIME,
    dtype: str = "float32",
) -> tuple[onnx.ModelProto, GraphStats]:
    """The whole model as an ONNX `ModelProto`. `weights` maps checkpoint names to tensors or arrays (every
    name `checkpoint_targets()` yields; `lm_head.weight` only when untied). With `data_file`, weights of at
    least `EXTERNAL_THRESHOLD` bytes are streamed there (named `data_location` relative to the model file).
    With `quant`, the projections are stored quantized (see the module docstring).

    `flavour="tensorrt"` builds the graph the TensorRT backend parses (static routing width, only ops of
    TensorRT's ONNX parser), in `dtype` ("float32", "bfloat16" or "float16"); it refuses `quant` with a
    ValueError, as it does a dtype other than float32 for the default onnxruntime flavour. A TensorRT-flavour
    model records `flavour` and `dtype` in its metadata_props."""
    from onnx import helper

    check_flavour(flavour, dtype, quant)
    builder = _Builder(data_file, data_location)
    inputs, outputs = _ErnieGraph(config, weights, builder, quant, flavour, dtype).build()
    graph = helper.make_graph(builder.nodes, "ernie4_5", inputs, outputs, initializer=builder.initializers)
    contrib = any(node.domain == MS_DOMAIN for node in builder.nodes)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if contrib else [])
    proto = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="ernie-serve",
        producer_version=GRAPH_VERSION,
    )
    proto.ir_version = 8  # the newest IR that onnxruntime >= 1.14 loads; opset 17 needs >= 8
    if flavour != ONNXRUNTIME:  # the default flavour's model stays byte for byte what it always was
        helper.set_model_props(proto, {"flavour": flavour, "dtype": dtype})
    builder.stats.num_nodes = len(builder.nodes)
    return proto, builder.stats


def save_graph(
    config: ModelConfig,
    weights: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    name: str = "model.onnx",
    quant: GraphQuantization | None = None,
    flavour: str = ONNXRUNTIME,
    dtype: str = "float32",
) -> GraphStats:
    """Write `name` and its external weights `name.data` into `out_dir` (see `build_graph`, which takes the
    same `quant`, `flavour` and `dtype`)."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_name = f"{name}.data"
    with open(out / data_name, "wb") as data_file:
        proto, stats = build_graph(config, weights, data_file, data_name, quant, flavour, dtype)
    if stats.external_bytes == 0:
        (out / data_name).unlink()
    onnx.save_model(proto, str(out / name))
    return stats
