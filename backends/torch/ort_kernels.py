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
4-bit matrices of at least `AUTO_MIN_WEIGHTS` weights here (`uses_onnxruntime`).

Each such matrix becomes one small ONNX graph (`x [T, K] -> MatMulNBits -> y [T, N]`) in its own inference
session; onnxruntime repacks the weight once when the session is made, and the row-wise codes are let go
(`QuantizedWeight.pack_for_device`). Threads: each session has its own intra-op pool of torch's thread count
with spin-waiting off. onnxruntime's pools spin after each run by default, and with thousands of sessions (the
21B-A3B has about 3,500 matrices) the spinning workers of the last few took the cores from everything else
(measured: decode 25x slower); its process-wide pool (`set_global_thread_pool_sizes`) cannot turn spinning off
from Python, and took torch's decode from 89 to 20 tokens/s. A pool without spinning parks its worker
thread between runs: it costs a thread per session, no CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from ernie_serve.backends.torch.malloc import trim_heap
from ernie_serve.quantization import QuantSpec, matmul_nbits_layout, storage_bytes

MS_DOMAIN = "com.microsoft"
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


def _session_options():  # -> onnxruntime.SessionOptions
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a session per matrix would repeat any warning thousands of times
    options.enable_cpu_mem_arena = False  # an arena per session would hold its largest output for good
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    return options


def _graph_bytes(packed: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits", ["x", "B", "scales"], ["y"], domain=MS_DOMAIN,
        K=k, N=n, bits=bits, block_size=block, accuracy_level=4,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "quantized_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        initializer=[numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


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
        import onnxruntime as ort

        out_features = scales.shape[1]
        sessions, nbytes = [], 0
        for start, stop in _pieces(out_features, in_features):
            codes = codes_of(slice(start, stop))  # [n, in]
            packed, block_scales, block = matmul_nbits_layout(codes, scales[:, start:stop].t(), spec)
            del codes
            model = _graph_bytes(packed.numpy(), block_scales.numpy(), in_features, stop - start, spec.bits, block)
            del packed, block_scales
            session = ort.InferenceSession(model, _session_options(), providers=["CPUExecutionProvider"])
            # The Python session keeps the model's bytes (to rebuild itself if its providers change, which never
            # happens here): a second copy of every weight. onnxruntime has its own, repacked, so drop them.
            if hasattr(session, "_model_bytes"):
                session._model_bytes = None
            del model
            sessions.append(session)
            # onnxruntime does not report its packed size: estimated from the codes and scales it was given
            piece_bytes = storage_bytes(stop - start, in_features, spec)
            nbytes += int(piece_bytes * (1 + PACKED_OVERHEAD)) + SESSION_OVERHEAD_BYTES
            _trim_now_and_then(piece_bytes)
        return cls(sessions, in_features, out_features, nbytes)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out] in x's dtype
        rows = x.detach().to(torch.float32).contiguous().numpy()  # no copy for a contiguous float32 CPU x
        outs = [torch.from_numpy(session.run(None, {"x": rows})[0]) for session in self.sessions]  # [T, piece]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.to(x.dtype)

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
