"""onnxruntime's `MatMulNBits` as the torch backend's 4-bit kernel on CPU (`--cpu-quantized-kernels`).

Measured on this project's 2-core AVX2 machine (docs/quantization.md, "Kernels"), torch's
`_weight_int4pack_mm_for_cpu` is compute-bound: it reads a 21B-A3B expert's 4-bit weights at about 7 GB/s, where
`MatMulNBits` with `accuracy_level=4` takes 2.1-3.4x less CPU time at every row count measured, on matrices from
the benchmark model's LM head up (about 12 GB/s on one thread for that expert). `accuracy_level=4` rounds the
activations to int8 per block of the input (one scale per block of 128 or 64 inputs, the weights' own blocks),
the way llama.cpp multiplies its q4_0 weights by q8 activations:
**W4A8 per block, not weight-only**. docs/quantization.md has its accuracy beside the weight-only kernels'.
For small matrices the call's fixed cost (the session, numpy, the thread wake-up) outweighs the gain, and
torch's int8 kernel is closer to memory speed, so `--cpu-quantized-kernels auto` (the default) sends only
4-bit matrices of at least `AUTO_MIN_WEIGHTS` weights here (`uses_onnxruntime`), and every matrix of a MoE model
whose routed experts run as one `QMoE` session a layer (`experts_run_as_qmoe`).

Each such matrix becomes one small ONNX graph (`x [T, K] -> MatMulNBits -> y [T, N]`) in its own inference
session, a SwiGLU MLP whose two matrices both come here one graph for the whole MLP (`FusedMLPKernel`), a
MoE layer's routed experts one graph around the contrib op `QMoE` (`RoutedExpertsKernel`), which runs only the
experts each token chose, in one call, or with its norm, router, shared experts and the attention's output
projection (`MoELayerKernel`), and an attention's norm, q|k|v projection and RoPE one graph
(`AttentionInputKernel`), which the previous layer's feed-forward session holds instead where that session starts
from its attention's output (`_LayerFromAttention`: two sessions a decode layer become one); onnxruntime repacks
the weights once when the session is made, and the row-wise codes are let go (`QuantizedWeight.pack_for_device`).

Threads (`share_thread_pool`): where onnxruntime holds most quantized bytes, all sessions share onnxruntime's
process-wide pool, whose worker spins between runs, and torch runs on one thread; elsewhere each session has
its own pool with spin-waiting off, since torch's workers need the cores. (Pools of their own that spin were
ruinous: with thousands of sessions the workers of the last few spun at once and took the cores from
everything else, decode 25x slower.)
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ernie_serve.backends.torch.malloc import trim_heap
from ernie_serve.core.config import ModelConfig
from ernie_serve.ort_contrib import MS_DOMAIN, external_tensor, qmoe_router_weights_supported, qmoe_supported
from ernie_serve.quantization import QuantSpec, matmul_nbits_layout, qmoe_block, qmoe_layout, storage_bytes

# measured (resident memory over 100 sessions of [2560, 1536] and of [2560, 3072], 4 bits, groups of 128):
# onnxruntime's packed weights take about 13% more than our codes and scales, and each session 0.12 MiB besides
SESSION_OVERHEAD_BYTES = 128 * 1024
PACKED_OVERHEAD = 0.13
PIECE_WEIGHTS = 1 << 25  # the most weights one session holds (see `NBitsKernel`)
TRIM_EVERY_BYTES = 64 << 20  # see `_trim_now_and_then`
# `auto` uses onnxruntime for 4-bit matrices of at least this many weights: measured, `MatMulNBits` beats
# torch's int4 kernel from [1536, 2560] up at one row (a 512 x 512 matrix is faster in torch: the call's fixed
# cost dominates); the 21B-A3B's smallest quantized matrix has 3.9M weights, the benchmark model's only its
# LM head (16.4M) reaches this.
AUTO_MIN_WEIGHTS = 1 << 21


@functools.cache
def onnxruntime_available() -> bool:
    """Whether onnxruntime and onnx (which builds the graphs) are installed: `pip install 'ernie-serve[onnx]'`."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def uses_onnxruntime(policy: str, spec: QuantSpec, in_features: int, out_features: int) -> bool:
    """Whether a quantized CPU matrix is multiplied by onnxruntime's kernel under `--cpu-quantized-kernels`
    `policy` ("auto", "onnxruntime" or "torch"; "auto" counts on onnxruntime being installed, which the backend
    checked when it resolved the option)."""
    if policy == "onnxruntime":
        return True
    return policy == "auto" and spec.bits == 4 and in_features * out_features >= AUTO_MIN_WEIGHTS


def experts_run_as_qmoe(config: ModelConfig, spec: QuantSpec) -> bool:
    """Whether `auto` sends every quantized matrix of this model to onnxruntime (as `--cpu-quantized-kernels
    onnxruntime` does): a MoE model whose layers' routed experts can each be one `QMoE` session (this
    onnxruntime has it, and one block fits both widths: `qmoe_block`) and hold `AUTO_MIN_WEIGHTS` or more a
    layer. One QMoE call a layer replaces a kernel call per chosen expert and torch's sorting around them, and
    with every matrix on onnxruntime its shared pool takes both cores: measured on the CPU benchmark model
    (6.3M expert weights a layer), wint8 decoded 1.3-1.6x and wint4 1.3-1.7x faster than under the matrix rule
    alone, before `MoELayerKernel` (docs/quantization.md). The tiny test models' experts (tens of thousands of
    weights) stay on torch's kernels."""
    if not config.is_moe or qmoe_block(spec, config.hidden_size, config.moe_intermediate_size) is None:
        return False
    layer_weights = config.moe_num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    return layer_weights >= AUTO_MIN_WEIGHTS and qmoe_supported()


_shared_pool = False  # whether this process has onnxruntime's process-wide pool: once it has, every session uses it


def share_thread_pool(threads: int) -> None:
    """Sessions made from now on run on onnxruntime's process-wide pool of `threads` threads, which spin-waits
    between runs, instead of each on a pool of its own that does not.

    For models whose weights onnxruntime holds most of, with torch on one thread (the backend's
    `_hand_cores_to_onnxruntime`, by the same rule): the pool's one worker spins on the core torch leaves it and
    takes up each product at once, where a session's own parked worker is woken for every product. Measured on
    the 21B-A3B (docs/quantization.md): 5.87 decode tokens/s shared, 3.12 with pools of their own. Where torch
    keeps its threads its OpenMP workers need that core: with torch on two threads and only the benchmark
    model's LM head in onnxruntime, a spinning pool took torch's decode from 89 to 20 tokens/s.

    onnxruntime makes the process-wide pool once and then refuses sessions with pools of their own, so every
    later session in the process uses it too (a model loaded afterwards whose products are mostly torch's runs
    beside a spinning worker: slower, correct); the onnx backend's sessions follow it as well."""
    global _shared_pool
    if _shared_pool:
        return
    import onnxruntime as ort

    try:
        ort.set_global_thread_pool_sizes(threads, 1)
    except Exception:  # refused: something else in this process made that pool already, with its own size
        pass
    _shared_pool = True


def _session_options():  # -> onnxruntime.SessionOptions
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a session per matrix would repeat any warning thousands of times
    options.enable_cpu_mem_arena = False  # an arena per session would hold its largest output for good
    if _shared_pool:
        options.use_per_session_threads = False
        return options
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    return options


def _matmul_node(x: str, name: str, y: str, k: int, n: int, bits: int, block: int):  # -> onnx.NodeProto
    from onnx import helper

    return helper.make_node(
        "MatMulNBits", [x, f"{name}.B", f"{name}.scales"], [y], domain=MS_DOMAIN,
        K=k, N=n, bits=bits, block_size=block, accuracy_level=4,
    )  # fmt: skip


def _packed_initializers(name: str, codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> tuple[list, int]:
    """`MatMulNBits`' weight and scales for codes `[n, in]` and scales `[n, G]` (`matmul_nbits_layout`), and its
    block size."""
    from onnx import numpy_helper

    packed, block_scales, block = matmul_nbits_layout(codes, scales, spec)
    weight = numpy_helper.from_array(packed.numpy(), f"{name}.B")
    return [weight, numpy_helper.from_array(block_scales.numpy(), f"{name}.scales")], block


def _session(
    nodes: list,
    initializers: list,
    x: tuple[str, int],
    y: tuple[str, int],
    extra_inputs: tuple[tuple[str, int], ...] = (),
    model_dir: str | None = None,
    extra_outputs: tuple[tuple[str, int], ...] = (),
) -> KernelSession:
    """A session of `nodes` from input `x` `[rows, x[1]]` (and `extra_inputs`, alike) to output `y` `[rows, y[1]]`
    (and `extra_outputs`, alike), all float32. With `model_dir`, whose file the initializers' external data
    already is (`_external_initializers`), the model is written there and loaded by path, so no in-memory copy of
    those weights is made on the way."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def values(pairs: Iterable[tuple[str, int]]) -> list:
        return [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", width]) for name, width in pairs]

    graph = helper.make_graph(
        nodes, "quantized_matmul", values([x, *extra_inputs]), values([y, *extra_outputs]), initializer=initializers
    )
    initializers.clear()  # the graph has its own copies: let the caller's go now
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    model: bytes | str = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    del graph
    if model_dir is not None:
        path = os.path.join(model_dir, "model.onnx")
        with open(path, "wb") as f:
            f.write(model)  # type: ignore[arg-type]
        model = path
    session = ort.InferenceSession(model, _session_options(), providers=["CPUExecutionProvider"])
    # The Python session keeps the model's bytes (to rebuild itself if its providers change, which never happens
    # here): a second copy of every weight. onnxruntime has its own, repacked, so drop them.
    if hasattr(session, "_model_bytes"):
        session._model_bytes = None
    return KernelSession(session)


_Run = Callable[[list[str], dict[str, np.ndarray]], list]  # (output names, feed) -> outputs


class KernelSession:
    """An onnxruntime session as the kernels call it: `run(output_names, feed)`, straight to the C session.

    onnxruntime's Python `InferenceSession.run` checks each call's feed names, OrtValue ownership and WebGPU graph
    capture before calling its C session, about 11 us a call here; a decode step of the CPU benchmark model makes 17
    such calls, whose feeds are fixed by their graphs (float32 numpy arrays on the CPU). Calling the C session
    directly decoded 1.022x faster, paired in one process (20 pairs, docs/quantization.md). A missing or misshapen
    input is still refused, by the C session. Where onnxruntime has no C session under its Python one (`_sess`, not
    a public name), the Python `run` is used."""

    __slots__ = ("inference_session", "run")

    def __init__(self, inference_session) -> None:  # an ort.InferenceSession
        self.inference_session = inference_session  # holds the session (and its weights) for as long as needed
        inner = getattr(inference_session, "_sess", None)
        if inner is not None and callable(getattr(inner, "run", None)):
            self.run: _Run = lambda names, feed: inner.run(names, feed, None)
        else:
            self.run = inference_session.run


def _external_initializers(arrays: dict[str, np.ndarray], path: str) -> list:  # -> [onnx.TensorProto]
    """Write `arrays` into the file `path`, each at a page boundary, and return initializers that point there
    (ONNX external data, relative to the model written beside it)."""
    from onnx import helper

    with open(path, "wb") as f:
        return [
            external_tensor(f, os.path.basename(path), name, array, helper.np_dtype_to_tensor_dtype(array.dtype))
            for name, array in arrays.items()
        ]


def _held_bytes(in_features: int, out_features: int, spec: QuantSpec) -> int:
    """onnxruntime does not report its packed size: estimated from the codes and scales it is given."""
    return int(storage_bytes(out_features, in_features, spec) * (1 + PACKED_OVERHEAD))


def _feed(x: torch.Tensor) -> np.ndarray:
    """x as float32 numpy, no copy where it already is float32 and contiguous (as every tensor the model passes
    in float32 is). The checks skip what would be a no-op call each: measured, the conversions around a session
    call took as long as onnxruntime's own per-call cost (about 20 us each), and a decode step makes 18 calls on
    the CPU benchmark model."""
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    return (x.detach() if x.requires_grad else x).numpy()


def _result(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    out = torch.from_numpy(array)
    return out if dtype == torch.float32 else out.to(dtype)


def _run(session, x: torch.Tensor, name: str = "x") -> torch.Tensor:  # [T, in] -> [T, out] in x's dtype
    return _result(session.run(["y"], {name: _feed(x)})[0], x.dtype)  # (naming the output: a lookup less)


class NBitsKernel:
    """One quantized `[in, out]` matrix as onnxruntime sessions computing `x @ W` in float32: one session per
    piece of at most `PIECE_WEIGHTS` weights along the output columns (the 21B-A3B's LM head is eight), so
    packing holds the temporaries of one piece at a time, not of a 265M-weight matrix."""

    def __init__(self, sessions: list, in_features: int, out_features: int, nbytes: int) -> None:
        self.sessions, self.in_features, self.out_features, self._nbytes = sessions, in_features, out_features, nbytes

    @classmethod
    def pack(
        cls, codes_of: Callable[[slice], torch.Tensor], scales: torch.Tensor, spec: QuantSpec, in_features: int
    ) -> NBitsKernel:
        """From `codes_of(columns)`, the signed codes `[columns, in]` of a range of output columns, and the scales
        `[G, out]` (the layout `QuantizedWeight` stores)."""
        out_features = scales.shape[1]
        sessions, nbytes = [], 0
        for start, stop in _pieces(out_features, in_features):
            codes = codes_of(slice(start, stop))  # [n, in]
            initializers, block = _packed_initializers("w", codes, scales[:, start:stop].t(), spec)
            del codes
            node = _matmul_node("x", "w", "y", in_features, stop - start, spec.bits, block)
            sessions.append(_session([node], initializers, ("x", in_features), ("y", stop - start)))
            nbytes += _held_bytes(in_features, stop - start, spec) + SESSION_OVERHEAD_BYTES
            _trim_now_and_then(storage_bytes(stop - start, in_features, spec))
        return cls(sessions, in_features, out_features, nbytes)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out] in x's dtype
        outs = [_run(session, x) for session in self.sessions]  # [T, piece] each
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def nbytes(self) -> int:
        return self._nbytes


def _swiglu_graph(
    x: str,
    y: str,
    gate_up: tuple[torch.Tensor, torch.Tensor],  # codes [2I, in] signed, scales [G, 2I]
    down: tuple[torch.Tensor, torch.Tensor],  # codes [out, I] signed, scales [G', out]
    spec: QuantSpec,
) -> tuple[list, list]:  # -> ([onnx.NodeProto], [onnx.TensorProto])
    """The nodes and initializers of `y = down(silu(gate(x)) * up(x))`: `MatMulNBits -> Split -> x * Sigmoid(x)
    -> Mul -> MatMulNBits` (a `FusedMLPKernel`, or the shared experts of a `MoELayerKernel`)."""
    from onnx import helper, numpy_helper

    (gate_up_codes, gate_up_scales), (down_codes, down_scales) = gate_up, down
    two_i, in_features = gate_up_codes.shape
    out_features, intermediate = down_codes.shape
    gate_up_tensors, gate_up_block = _packed_initializers("gate_up", gate_up_codes, gate_up_scales.t(), spec)
    down_tensors, down_block = _packed_initializers("down", down_codes, down_scales.t(), spec)
    halves = numpy_helper.from_array(np.array([intermediate, intermediate], dtype=np.int64), "halves")
    nodes = [
        _matmul_node(x, "gate_up", "gate_up.y", in_features, two_i, spec.bits, gate_up_block),  # [T, 2I]
        helper.make_node("Split", ["gate_up.y", "halves"], ["gate", "up"], axis=1),  # [T, I] each
        helper.make_node("Sigmoid", ["gate"], ["gate.sigmoid"]),
        helper.make_node("Mul", ["gate", "gate.sigmoid"], ["gate.silu"]),
        helper.make_node("Mul", ["gate.silu", "up"], ["hidden"]),  # [T, I]
        _matmul_node("hidden", "down", y, intermediate, out_features, spec.bits, down_block),  # [T, out]
    ]
    return nodes, [*gate_up_tensors, *down_tensors, halves]


def fits_one_session(in_features: int, intermediate: int, out_features: int) -> bool:
    """Whether a SwiGLU MLP (`[in, 2*intermediate]` gate|up, `[intermediate, out]` down) is small enough for
    one `FusedMLPKernel` (the 21B-A3B's experts and shared experts are; its dense first MLP, 94M weights, is
    not)."""
    return intermediate * (2 * in_features + out_features) <= PIECE_WEIGHTS


class FusedMLPKernel:
    """A whole SwiGLU MLP, `down(silu(gate(x)) * up(x))`, as one onnxruntime session: a routed expert, the
    shared experts or a dense MLP whose two matrices both go to onnxruntime (`fits_one_session`).

    Same arithmetic as its two matrices' `NBitsKernel`s with torch's SiLU between them (the down projection's
    input is rounded to int8 per block either way), in one call instead of two plus four torch ops, and half
    the sessions (docs/quantization.md has what it gained on the 21B-A3B)."""

    def __init__(self, session, out_features: int, nbytes: int) -> None:
        self.session, self.out_features, self._nbytes = session, out_features, nbytes

    @classmethod
    def pack(
        cls,
        gate_up: tuple[torch.Tensor, torch.Tensor],  # codes [2I, in] signed, scales [G, 2I]
        down: tuple[torch.Tensor, torch.Tensor],  # codes [out, I] signed, scales [G', out]
        spec: QuantSpec,
    ) -> FusedMLPKernel:
        two_i, in_features = gate_up[0].shape
        out_features, intermediate = down[0].shape
        nodes, initializers = _swiglu_graph("x", "y", gate_up, down, spec)
        session = _session(nodes, initializers, ("x", in_features), ("y", out_features))
        nbytes = _held_bytes(in_features, two_i, spec) + _held_bytes(intermediate, out_features, spec)
        _trim_now_and_then(storage_bytes(two_i, in_features, spec) + storage_bytes(out_features, intermediate, spec))
        return cls(session, out_features, nbytes + SESSION_OVERHEAD_BYTES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out] in x's dtype
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return _run(self.session, x)

    def nbytes(self) -> int:
        return self._nbytes


class _LayerFromAttention:
    """What `MLPLayerKernel` and `MoELayerKernel` share where their session starts from the attention's output `a`
    and the residual stream `x` before attention, and ends at the residual stream after the layer, `y`
    (`forward_after_attention`); where it also holds the next layer's attention input half (`next_widths`), it
    ends at that layer's rotated q and k | v as well (`forward_chained`): the two layers' sessions as one call.
    Measured in a decode step of the CPU benchmark model, each call between them cost about 47 us beyond its
    nodes (a trivial session added after each layer's, paired in one process; docs/quantization.md)."""

    session: KernelSession
    hidden: int
    takes_attention = False  # whether it starts from the attention's output
    next_widths: tuple[int, int] | None = None  # the next layer's (Q D, 2 K D), where it computes them too

    def _chain(
        self, nodes: list, initializers: list, next_attention: AttentionInputParts | None, spec: QuantSpec
    ) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """Appends the next layer's attention input half to a layer graph ending at `y` (where given); returns the
        session's extra (name, width) inputs and outputs."""
        if next_attention is None:
            return (), ()
        chained_nodes, chained_initializers = _attention_input_graph("y", next_attention, spec, prefix="next.")
        nodes += chained_nodes
        initializers += chained_initializers
        self.next_widths = next_attention.widths
        half = next_attention.head_dim // 2
        return (("cos", half), ("sin", half)), (("q", self.next_widths[0]), ("kv", self.next_widths[1]))

    def forward_after_attention(
        self,
        attended: torch.Tensor,  # [T, Q*D] the attention's output before its projection
        residual: torch.Tensor,  # [T, H] the residual stream before attention
    ) -> torch.Tensor:  # [T, H] in residual's dtype
        assert self.takes_attention and self.next_widths is None
        if residual.shape[0] == 0:
            return residual.new_empty(0, self.hidden)
        out = self.session.run(["y"], {"attended": _feed(attended), "residual": _feed(residual)})[0]  # [T, H]
        return _result(out, residual.dtype)

    def forward_chained(
        self,
        attended: torch.Tensor,  # [T, Q*D] the attention's output before its projection
        residual: torch.Tensor,  # [T, H] the residual stream before attention
        cos: torch.Tensor,  # [T, D/2] float32, each row's angles
        sin: torch.Tensor,  # [T, D/2]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> this layer's output `[T, H]`, the next layer's rotated q `[T, Q D]` and rotated k | v `[T, 2 K D]`, in
        residual's dtype."""
        assert self.takes_attention and self.next_widths is not None
        q_width, kv_width = self.next_widths
        if residual.shape[0] == 0:
            return residual.new_empty(0, self.hidden), residual.new_empty(0, q_width), residual.new_empty(0, kv_width)
        feed = {"attended": _feed(attended), "residual": _feed(residual), "cos": _feed(cos), "sin": _feed(sin)}
        y, q, kv = self.session.run(["y", "q", "kv"], feed)
        return _result(y, residual.dtype), _result(q, residual.dtype), _result(kv, residual.dtype)


class MLPLayerKernel(_LayerFromAttention):
    """The whole feed-forward half of a dense decoder layer as one onnxruntime session, from the attention's
    output `a` and the residual stream `x` before attention: `h = x + a @ W_o (+ b)`, `n = rmsnorm(h)` (the
    post-attention norm), `y = h + down(silu(gate(n)) * up(n))`, and with `next_attention` the next layer's
    attention input half from `y` (`AttentionInputKernel`'s graph). What `MoELayerKernel` with the attention's
    output projection is to a MoE layer: one call instead of the output projection's session, torch's norm and
    sums, and the MLP's session (ERNIE's first layer is dense; docs/quantization.md has the decode rate)."""

    takes_attention = True  # it starts from the attention's output (as `MoELayerKernel` may)

    def __init__(self, hidden: int) -> None:
        self.hidden, self._nbytes = hidden, 0

    @classmethod
    def pack(
        cls,
        attention_output: tuple[torch.Tensor, torch.Tensor],  # codes [H, Q*D] signed, scales [G, H]
        attention_bias: torch.Tensor | None,  # [H]
        norm_weight: torch.Tensor,  # [H] the post-attention RMSNorm
        eps: float,
        gate_up: tuple[torch.Tensor, torch.Tensor],  # codes [2I, H] signed, scales [G, 2I]
        down: tuple[torch.Tensor, torch.Tensor],  # codes [H, I] signed, scales [G', H]
        spec: QuantSpec,
        next_attention: AttentionInputParts | None = None,
    ) -> MLPLayerKernel:
        from onnx import helper, numpy_helper

        (o_codes, o_scales), hidden = attention_output, attention_output[0].shape[0]
        kernel = cls(hidden)
        attended, two_i = o_codes.shape[1], gate_up[0].shape[0]
        initializers, o_block = _packed_initializers("o_proj", o_codes, o_scales.t(), spec)
        initializers.append(numpy_helper.from_array(norm_weight.float().numpy(), "norm.weight"))
        stream = ["o_proj.y", "residual"]
        if attention_bias is not None:
            initializers.append(numpy_helper.from_array(attention_bias.float().numpy(), "o_proj.bias"))
            stream.append("o_proj.bias")
        mlp_nodes, mlp_initializers = _swiglu_graph("n", "mlp", gate_up, down, spec)  # [T, H]
        node = helper.make_node
        nodes = [
            _matmul_node("attended", "o_proj", "o_proj.y", attended, hidden, spec.bits, o_block),  # [T, H]
            node("Sum", stream, ["h"]),  # [T, H] the residual stream after attention
            node("SimplifiedLayerNormalization", ["h", "norm.weight"], ["n"], axis=-1, epsilon=eps, stash_type=1),
            *mlp_nodes,
            node("Add", ["h", "mlp"], ["y"]),  # [T, H]
        ]
        initializers += mlp_initializers
        extra_inputs, extra_outputs = kernel._chain(nodes, initializers, next_attention, spec)
        kernel.session = _session(
            nodes, initializers, ("attended", attended), ("y", hidden), (("residual", hidden), *extra_inputs),
            extra_outputs=extra_outputs,
        )  # fmt: skip
        sizes = [(hidden, attended), (two_i, hidden), (hidden, two_i // 2)]  # [out, in] of each matrix
        if next_attention is not None:
            sizes.append(tuple(next_attention.qkv[0].shape))
        _trim_now_and_then(sum(storage_bytes(out, in_, spec) for out, in_ in sizes))
        kernel._nbytes = sum(_held_bytes(in_, out, spec) for out, in_ in sizes) + SESSION_OVERHEAD_BYTES
        return kernel

    def nbytes(self) -> int:
        return self._nbytes


class NormedHeadKernel:
    """The final RMSNorm and the LM head as one onnxruntime session: `rmsnorm(x) @ W_head`, float32 logits. One
    call instead of torch's norm and the head's session; the head is one session's worth of weights
    (`PIECE_WEIGHTS`), as the benchmark model's is (16M weights) and the 0.3B's (106M) and the 21B-A3B's (265M)
    are not."""

    def __init__(self, session, vocab: int, nbytes: int) -> None:
        self.session, self.vocab, self._nbytes = session, vocab, nbytes

    @classmethod
    def pack(
        cls,
        norm_weight: torch.Tensor,  # [H] the final RMSNorm
        eps: float,
        head: tuple[torch.Tensor, torch.Tensor],  # codes [V, H] signed, scales [G, V]
        spec: QuantSpec,
    ) -> NormedHeadKernel:
        from onnx import helper, numpy_helper

        (codes, scales), (vocab, hidden) = head, head[0].shape
        initializers, block = _packed_initializers("head", codes, scales.t(), spec)
        initializers.append(numpy_helper.from_array(norm_weight.float().numpy(), "norm.weight"))
        nodes = [
            helper.make_node(
                "SimplifiedLayerNormalization", ["x", "norm.weight"], ["n"], axis=-1, epsilon=eps, stash_type=1
            ),
            _matmul_node("n", "head", "y", hidden, vocab, spec.bits, block),  # [S, V]
        ]
        session = _session(nodes, initializers, ("x", hidden), ("y", vocab))
        _trim_now_and_then(storage_bytes(vocab, hidden, spec))
        return cls(session, vocab, _held_bytes(hidden, vocab, spec) + SESSION_OVERHEAD_BYTES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V] float32
        if x.shape[0] == 0:
            return x.new_empty(0, self.vocab, dtype=torch.float32)
        return _result(self.session.run(["y"], {"x": _feed(x)})[0], torch.float32)

    def nbytes(self) -> int:
        return self._nbytes


@dataclass
class AttentionInputParts:
    """What an attention's input half is made of, for `AttentionInputKernel` or the previous layer's session
    (`MLPLayerKernel`, `MoELayerParts.next_attention`): the layer's input norm, its q|k|v codes and RoPE's shape."""

    norm_weight: torch.Tensor  # [H] the layer's input RMSNorm
    eps: float
    qkv: tuple[torch.Tensor, torch.Tensor]  # codes [(Q+2K) D, H] signed, scales [G, (Q+2K) D]
    bias: torch.Tensor | None  # [(Q+2K) D]
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def widths(self) -> tuple[int, int]:
        """The widths of its two outputs: rotated q `Q D`, rotated k beside v `2 K D`."""
        return self.heads * self.head_dim, 2 * self.kv_heads * self.head_dim


def _attention_input_graph(x: str, parts: AttentionInputParts, spec: QuantSpec, prefix: str) -> tuple[list, list]:
    """The nodes and initializers of `AttentionInputKernel`'s computation from the graph value `x` `[T, H]`, given
    the graph inputs `cos` and `sin` `[T, D/2]`, to the graph outputs `q` `[T, Q D]` and `kv` `[T, 2 K D]`; every
    other name begins with `prefix` (so it can join another layer's graph)."""
    from onnx import helper, numpy_helper

    codes, scales = parts.qkv
    width, hidden = codes.shape
    q_width, kv_width = parts.heads * parts.head_dim, parts.kv_heads * parts.head_dim
    assert width == q_width + 2 * kv_width, (width, q_width, kv_width)
    initializers, block = _packed_initializers(f"{prefix}qkv", codes, scales.t(), spec)
    small = {
        "norm.weight": parts.norm_weight.float().numpy(),
        "split": np.array([q_width + kv_width, kv_width], dtype=np.int64),
        "split.qk": np.array([q_width, kv_width], dtype=np.int64),
        "first": np.array([0], dtype=np.int64),  # RotaryEmbedding's position ids: rows 0.. of cos and sin
        "batch_axis": np.array([0], dtype=np.int64),
    }
    if parts.bias is not None:
        small["qkv.bias"] = parts.bias.float().numpy()
    initializers += [numpy_helper.from_array(array, prefix + name) for name, array in small.items()]

    def node(op: str, inputs: list[str], outputs: list[str], **attributes):  # -> onnx.NodeProto
        named = [name if name in ("cos", "sin", "q", "kv", x) else prefix + name for name in (*inputs, *outputs)]
        return helper.make_node(op, named[: len(inputs)], named[len(inputs) :], **attributes)

    projected = "qkv.y" if parts.bias is None else "qkv.unbiased"
    nodes = [
        node("SimplifiedLayerNormalization", [x, "norm.weight"], ["n"], axis=-1, epsilon=parts.eps, stash_type=1),
        _matmul_node(prefix + "n", prefix + "qkv", prefix + projected, hidden, width, spec.bits, block),  # [T, (Q+2K)D]
        *([node("Add", [projected, "qkv.bias"], ["qkv.y"])] if parts.bias is not None else []),
        node("Split", ["qkv.y", "split"], ["qk.flat", "v"], axis=1),  # [T, (Q+K) D], [T, K D]
        node("Unsqueeze", ["qk.flat", "batch_axis"], ["qk.batch"]),  # [1, T, (Q+K) D]
        node(
            "RotaryEmbedding",
            ["qk.batch", "first", "cos", "sin"],
            ["qk.rotated"],
            domain=MS_DOMAIN,
            interleaved=1,
            num_heads=parts.heads + parts.kv_heads,
        ),
        node("Squeeze", ["qk.rotated", "batch_axis"], ["qk"]),  # [T, (Q+K) D]
        node("Split", ["qk", "split.qk"], ["q", "k"], axis=1),  # [T, Q D], [T, K D]
        node("Concat", ["k", "v"], ["kv"], axis=1),  # [T, 2 K D]
    ]
    return nodes, initializers


class AttentionInputKernel:
    """The first half of an attention block as one onnxruntime session, from the residual stream `x` to the
    rotated queries, and the rotated keys beside the values as the KV cache holds them: `n = rmsnorm(x)`
    (`SimplifiedLayerNormalization`), `n @ W_qkv (+ b)` (`MatMulNBits`), RoPE on q and k together (onnxruntime's
    `RotaryEmbedding` over `[T, (Q+K) D]` as Q + K heads, interleaved pairs as ERNIE rotates them; its cos/sin
    "caches" are this step's own `[T, D/2]`, indexed from 0), then `k | v` side by side, `[T, 2 K D]`, which
    torch writes into the layer's cache in one copy. One call instead of torch's norm, the projection's session
    and torch's complex rotation between them (docs/quantization.md has the decode rate it gained). Only the
    first layer's runs on its own where each layer's feed-forward session also computes the next layer's
    (`MoELayerParts.next_attention`, `MLPLayerKernel.pack`)."""

    def __init__(self, session, q_width: int, kv_width: int, nbytes: int) -> None:
        self.session, self.q_width, self.kv_width, self._nbytes = session, q_width, kv_width, nbytes

    @classmethod
    def pack(cls, parts: AttentionInputParts, spec: QuantSpec) -> AttentionInputKernel:
        nodes, initializers = _attention_input_graph("x", parts, spec, prefix="")
        (width, hidden), half = parts.qkv[0].shape, parts.head_dim // 2
        q_width, kv_width = parts.widths
        session = _session(
            nodes, initializers, ("x", hidden), ("q", q_width), (("cos", half), ("sin", half)),
            extra_outputs=(("kv", kv_width),),
        )  # fmt: skip
        _trim_now_and_then(storage_bytes(width, hidden, spec))
        return cls(session, q_width, kv_width, _held_bytes(hidden, width, spec) + SESSION_OVERHEAD_BYTES)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos: torch.Tensor,  # [T, D/2] float32, each row's angles
        sin: torch.Tensor,  # [T, D/2]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q [T, Q D], rotated k | v [T, 2 K D], in x's dtype
        if x.shape[0] == 0:
            return x.new_empty(0, self.q_width), x.new_empty(0, self.kv_width)
        q, kv = self.session.run(["q", "kv"], {"x": _feed(x), "cos": _feed(cos), "sin": _feed(sin)})
        return _result(q, x.dtype), _result(kv, x.dtype)

    def nbytes(self) -> int:
        return self._nbytes


ExpertCodes = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _stacked_experts(experts: Iterable[ExpertCodes], num_experts: int, spec: QuantSpec, block: int) -> dict:
    """QMoE's stacked weights `{fc1, fc1.scales, fc2, fc2.scales}` (numpy `[E, ...]`) from each expert's (gate|up
    codes `[2I, H]` signed, scales `[G, 2I]`) and (down codes `[H, I]`, scales `[G', H]`), taken one expert at a
    time: gate and up rows interleaved (`qmoe_layout`)."""
    arrays: dict[str, np.ndarray] = {}
    for e, ((gate_up_codes, gate_up_scales), (down_codes, down_scales)) in enumerate(experts):
        intermediate = gate_up_codes.shape[0] // 2
        # gate_0, up_0, gate_1, up_1, ...: row 2j is gate row j, row 2j + 1 up row j
        interleave = torch.stack([torch.arange(intermediate), intermediate + torch.arange(intermediate)], 1)
        interleave = interleave.flatten()  # [2I]
        parts = {}
        parts["fc1"], parts["fc1.scales"] = qmoe_layout(
            gate_up_codes[interleave], gate_up_scales.t()[interleave], spec, block
        )  # [2I, H * bits / 8], [2I, H / block]
        parts["fc2"], parts["fc2.scales"] = qmoe_layout(down_codes, down_scales.t(), spec, block)  # [H, ...]
        for name, part in parts.items():
            if name not in arrays:  # stacked [E, ...], filled expert by expert
                arrays[name] = np.empty((num_experts, *part.shape), part.numpy().dtype)
            arrays[name][e] = part.numpy()
        del gate_up_codes, down_codes, parts
    return arrays


def _qmoe_node(
    x: str, router: str, y: str, spec: QuantSpec, top_k: int, block: int, weights: str | None = None
):  # -> onnx.NodeProto
    """QMoE over the initializers `_stacked_experts` names: the top k of `router`, weighted by the softmax of
    `router` renormalized over them, or with `weights` (`qmoe_router_weights_supported`) by `weights` at them,
    renormalized."""
    from onnx import helper

    inputs = [x, router, "fc1", "fc1.scales", "", "fc2", "fc2.scales"]
    if weights is not None:
        inputs += [""] * 7 + [weights]  # (no biases, fc3 or zero points: router_weights is input 14)
    return helper.make_node(
        "QMoE", inputs, [y], domain=MS_DOMAIN,
        k=top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
        expert_weight_bits=spec.bits, block_size=block, accuracy_level=4, activation_alpha=1.0,
        activation_beta=0.0,
    )  # fmt: skip


class _ExpertsSession:
    """A session over a MoE layer's stacked experts: `session`, the hidden width, and the bytes it holds."""

    def __init__(self, session, hidden: int, nbytes: int) -> None:
        self.session, self.hidden, self._nbytes = session, hidden, nbytes

    def nbytes(self) -> int:
        return self._nbytes


class RoutedExpertsKernel(_ExpertsSession):
    """A MoE layer's routed experts as one onnxruntime session around the contrib op `QMoE`, which groups the
    tokens by expert and runs only the chosen experts, inside one call: for the 21B-A3B's 64 experts, one call a
    layer instead of one `FusedMLPKernel` call per chosen expert with torch's sort, gather, weighting and scatter
    around them (measured side by side: docs/quantization.md, "ERNIE-4.5-21B-A3B on this 24 GB machine").

    The layer still routes in torch (float32 router, the correction bias only for the choice); QMoE routes by
    itself (softmax of its router input, top k, weights renormalized over the k), so `forward` gives it the
    router's logits at the chosen experts and `MASKED_LOGIT` elsewhere: the softmax of that is each chosen
    expert's probability over the chosen ones' sum, which is ERNIE's weight (unless those probabilities sum below
    ERNIE's `moe_norm_min`, 1e-12, whose floor QMoE does not apply). Experts stacked, gate and up rows
    interleaved (`swiglu_fusion=1`, the only fused layout QMoE takes on CPU); `accuracy_level=4` as for
    `MatMulNBits` here: activations rounded to int8 per block (8-bit experts round them whatever the level)."""

    MASKED_LOGIT = -1e9  # exp(MASKED_LOGIT - max) is exactly 0 in float32

    @classmethod
    def pack(
        cls,
        experts: Iterable[ExpertCodes],
        num_experts: int,
        spec: QuantSpec,
        top_k: int,
        block: int,
    ) -> RoutedExpertsKernel:
        """From each expert's (gate|up codes `[2I, H]` signed, scales `[G, 2I]`) and (down codes `[H, I]`, scales
        `[G', H]`), taken one expert at a time (an iterator: one expert's codes alive at once); `block` from
        `qmoe_block`. The stacked layout is one layer's (about 0.4 GB for the 21B-A3B at 4 bits), written to a
        temporary file that onnxruntime reads: in memory the protobuf tensors, the serialized model and
        onnxruntime's parsed copy would each hold it again, on a model that fits this machine with 1.5 GB to
        spare. It is gone once onnxruntime has its packed copy."""
        arrays = _stacked_experts(experts, num_experts, spec, block)
        hidden, nbytes = arrays["fc2"].shape[1], sum(array.nbytes for array in arrays.values())
        node = _qmoe_node("x", "router", "y", spec, top_k, block)
        with tempfile.TemporaryDirectory(prefix="ernie-serve-qmoe-") as model_dir:
            initializers = _external_initializers(arrays, os.path.join(model_dir, "weights.bin"))
            del arrays
            session = _session(
                [node], initializers, ("x", hidden), ("y", hidden), (("router", num_experts),), model_dir
            )
        _trim_now_and_then(nbytes)
        return cls(session, hidden, int(nbytes * (1 + PACKED_OVERHEAD)) + SESSION_OVERHEAD_BYTES)

    def forward(self, x: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x `[T, H]`, the router's float32 logits `[T, E]` and the chosen experts `[T, k]` -> the chosen experts'
        outputs weighted and summed, `[T, H]` in x's dtype."""
        if x.shape[0] == 0:
            return x.new_empty(0, self.hidden)
        router = torch.full_like(logits, self.MASKED_LOGIT).scatter_(1, experts, logits.gather(1, experts))  # [T, E]
        out = self.session.run(["y"], {"x": _feed(x), "router": _feed(router)})[0]  # [T, H]
        return _result(out, x.dtype)


@dataclass
class MoELayerParts:
    """What a MoE layer adds to its routed experts in one `MoELayerKernel`: the norm before it, the router, and
    the shared experts' codes, all float32 but the codes."""

    norm_weight: torch.Tensor  # [H] the post-attention RMSNorm
    eps: float
    router_weight: torch.Tensor  # [E, H]
    score_bias: torch.Tensor  # [E] added to the probabilities only to choose
    shared: ExpertCodes | None  # (gate|up codes [2S, H], scales [G, 2S]), (down codes [H, S], scales [G', H])
    adds_residual: bool = True  # False on a tensor-parallel rank but the first: its output is a partial sum
    # the attention's output projection (codes [H, Q*D] signed, scales [G, H]) and bias [H], where the kernel
    # starts from the attention's output instead of the residual stream after it (one device, no reduction)
    attention_output: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_bias: torch.Tensor | None = None
    # the next layer's attention input half, where the kernel computes it too (`forward_chained`; with
    # `attention_output` only)
    next_attention: AttentionInputParts | None = None


class MoELayerKernel(_ExpertsSession, _LayerFromAttention):
    """The whole feed-forward half of a MoE decoder layer as one onnxruntime session, from the residual stream
    after attention `h` to `h + shared(n) + routed(n)`, `n = rmsnorm(h)`: the norm, the float32 router, `QMoE` over
    the chosen experts (choosing by softmax + correction bias and weighting by the softmax, both given as they are
    where `QMoE` takes `router_weights`: `qmoe_router_weights_supported`; else, as `RoutedExpertsKernel`, given the
    logits at the experts a `TopK` chose and `MASKED_LOGIT` elsewhere), the shared experts (as `FusedMLPKernel`)
    and the sums. One call a layer instead of two sessions and a dozen torch ops between them: measured side by side,
    1.19-1.22x the single-request decode rate on the CPU benchmark model (whose small layers make those ops a
    large part of a step), no difference beyond the noise on the 21B-A3B's (docs/quantization.md).

    With `MoELayerParts.attention_output` it starts one step earlier, from the attention's output `a` and the
    residual stream `x` before attention: `h = x + a @ W_o (+ b)` (`forward_after_attention`), and with
    `MoELayerParts.next_attention` too it ends one step later, at the next layer's rotated q and k | v
    (`forward_chained`)."""

    @classmethod
    def pack(
        cls,
        experts: Iterable[ExpertCodes],
        num_experts: int,
        spec: QuantSpec,
        top_k: int,
        block: int,
        layer: MoELayerParts,
    ) -> MoELayerKernel:
        """`experts` and `block` as for `RoutedExpertsKernel.pack` (stacked through a temporary file)."""
        from onnx import helper, numpy_helper

        arrays = _stacked_experts(experts, num_experts, spec, block)
        hidden, nbytes = arrays["fc2"].shape[1], sum(array.nbytes for array in arrays.values())
        floats = {
            "norm.weight": layer.norm_weight.float(),  # [H]
            "router.weight": layer.router_weight.float().t().contiguous(),  # [H, E]
            "router.bias": layer.score_bias.float().flatten(),  # [E]
        }
        small = [numpy_helper.from_array(t.numpy(), name) for name, t in floats.items()]
        node = helper.make_node
        nodes = []
        inputs: tuple[tuple[str, int], tuple[tuple[str, int], ...]] = (("h", hidden), ())
        if layer.attention_output is not None:
            assert layer.adds_residual, "a partial sum of ranks cannot be normalized before the reduction"
            codes, scales = layer.attention_output  # [H, Q*D], [G, H]
            attended = codes.shape[1]
            o_tensors, o_block = _packed_initializers("o_proj", codes, scales.t(), spec)
            small += o_tensors
            stream = ["o_proj.y", "residual"]
            if layer.attention_bias is not None:
                small.append(numpy_helper.from_array(layer.attention_bias.float().numpy(), "o_proj.bias"))
                stream.append("o_proj.bias")
            nodes += [
                _matmul_node("attended", "o_proj", "o_proj.y", attended, hidden, spec.bits, o_block),  # [T, H]
                node("Sum", stream, ["h"]),  # [T, H] the residual stream after attention
            ]
            inputs = (("attended", attended), (("residual", hidden),))
            nbytes += storage_bytes(hidden, attended, spec)
        nodes += [
            node("SimplifiedLayerNormalization", ["h", "norm.weight"], ["n"], axis=-1, epsilon=layer.eps, stash_type=1),
            node("MatMul", ["n", "router.weight"], ["logits"]),  # [T, E]
            node("Softmax", ["logits"], ["probs"], axis=-1),
            node("Add", ["probs", "router.bias"], ["choice"]),  # [T, E] only to choose
        ]
        if qmoe_router_weights_supported():  # five nodes fewer (1.02x decode, docs/quantization.md)
            nodes.append(_qmoe_node("n", "choice", "routed", spec, top_k, block, weights="probs"))  # [T, H]
        else:
            small.append(numpy_helper.from_array(np.array([top_k], dtype=np.int64), "k"))
            small.append(numpy_helper.from_array(np.array(RoutedExpertsKernel.MASKED_LOGIT, np.float32), "masked"))
            nodes += [
                node("TopK", ["choice", "k"], ["choice.top", "chosen"], axis=-1, largest=1, sorted=1),  # [T, k]
                node("GatherElements", ["logits", "chosen"], ["chosen.logits"], axis=1),  # [T, k]
                node("Shape", ["logits"], ["logits.shape"]),
                node("Expand", ["masked", "logits.shape"], ["masked.all"]),  # [T, E]
                node("ScatterElements", ["masked.all", "chosen", "chosen.logits"], ["router"], axis=1),  # [T, E]
                _qmoe_node("n", "router", "routed", spec, top_k, block),  # [T, H]
            ]
        terms = ["routed"] + (["h"] if layer.adds_residual else [])
        if layer.shared is not None:
            shared_nodes, shared_initializers = _swiglu_graph("n", "shared", *layer.shared, spec)  # [T, H]
            nodes += shared_nodes
            small += shared_initializers
            terms.append("shared")
            two_s = layer.shared[0][0].shape[0]
            nbytes += storage_bytes(two_s, hidden, spec) + storage_bytes(hidden, two_s // 2, spec)
        nodes.append(node("Sum", terms, ["y"]))  # [T, H]
        kernel = cls(None, hidden, 0)
        kernel.takes_attention = layer.attention_output is not None
        assert kernel.takes_attention or layer.next_attention is None, "the next layer's input needs the whole layer"
        extra_inputs, extra_outputs = kernel._chain(nodes, small, layer.next_attention, spec)
        if layer.next_attention is not None:
            nbytes += storage_bytes(*layer.next_attention.qkv[0].shape, spec)
        with tempfile.TemporaryDirectory(prefix="ernie-serve-qmoe-") as model_dir:
            initializers = _external_initializers(arrays, os.path.join(model_dir, "weights.bin"))
            del arrays
            kernel.session = _session(
                nodes, [*initializers, *small], inputs[0], ("y", hidden), (*inputs[1], *extra_inputs), model_dir,
                extra_outputs,
            )  # fmt: skip
        _trim_now_and_then(nbytes)
        kernel._nbytes = int(nbytes * (1 + PACKED_OVERHEAD)) + SESSION_OVERHEAD_BYTES
        return kernel

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H] in h's dtype
        assert not self.takes_attention
        if h.shape[0] == 0:
            return h.new_empty(0, self.hidden)
        return _run(self.session, h, "h")


class FusedPart:
    """What each matrix of a session that holds several keeps as its device kernel (a `FusedMLPKernel`'s MLP,
    a MoE layer's experts and shared experts and its attention's output projection in a `MoELayerKernel` or
    `RoutedExpertsKernel`, an attention's q|k|v in an `AttentionInputKernel`): its share of the session's bytes
    (for the reports). It cannot multiply on its own; its block calls that session instead."""

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this matrix is multiplied only inside the fused session that holds it (FusedPart)")

    def nbytes(self) -> int:
        return self._nbytes


_untrimmed_bytes = 0  # packed since the heap was last trimmed


def _trim_now_and_then(packed_bytes: int) -> None:
    """Each session's freed temporaries (the model bytes, onnxruntime's parsed copy: several times the weight)
    lie between the packed weights it keeps, and glibc's heap keeps them: packing one stack of 64 experts of the
    21B-A3B's shapes left resident memory 1.9 GiB above what they hold. Trimming after every session bounds
    that but costs a walk of the whole heap each time (on the 21B-A3B, 5.4 minutes of repacking instead of
    2.7), so it is done once per `TRIM_EVERY_BYTES` of weights packed."""
    global _untrimmed_bytes
    _untrimmed_bytes += packed_bytes
    if _untrimmed_bytes >= TRIM_EVERY_BYTES:
        trim_heap()
        _untrimmed_bytes = 0


def _pieces(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Output column ranges of at most `PIECE_WEIGHTS` weights each, of even width (two 4-bit codes a byte)."""
    count = -(-out_features * in_features // PIECE_WEIGHTS)
    width = -(-out_features // count)
    width += width % 2
    return [(start, min(start + width, out_features)) for start in range(0, out_features, width)]
