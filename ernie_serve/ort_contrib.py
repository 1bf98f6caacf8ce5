"""onnxruntime as both backends that run it use it: the onnx backend's graphs and the torch backend's quantized CPU
kernels (`backends/torch/ort_kernels.py`). Sessions on onnxruntime's process-wide thread pool where this process
has one, and whether the installed onnxruntime runs the contrib op `QMoE` as they build it. onnxruntime and onnx
are imported only when called (`pip install 'ernie-serve[onnx]'`)."""

from __future__ import annotations

import functools
from typing import Any, BinaryIO

import numpy as np
import structlog

log = structlog.get_logger("ernie_serve.onnxruntime")

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops: the quantized kernels
EXTERNAL_ALIGN = 4096  # external tensors start at page boundaries, so onnxruntime can map them


def external_tensor(data_file: BinaryIO, location: str, name: str, array: np.ndarray, data_type: int) -> Any:
    """Append `array`'s bytes to `data_file` at a page boundary and return the initializer (an
    `onnx.TensorProto` of `data_type`) that points there, as ONNX external data at `location`, the data file's
    path relative to the model. The bytes are written from the array itself, without a copy."""
    from onnx import TensorProto

    offset = data_file.seek(-data_file.tell() % EXTERNAL_ALIGN, 1)
    data_file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    tensor = TensorProto(name=name, data_type=data_type, dims=array.shape)
    for key, value in (("location", location), ("offset", offset), ("length", array.nbytes)):
        tensor.external_data.add(key=key, value=str(value))
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def inference_session(
    model: str | bytes, options: Any, providers: list[str], say_so: bool = True
) -> Any:  # -> ort.InferenceSession
    """`ort.InferenceSession(model, options, providers)`, on onnxruntime's process-wide thread pool where this
    process has one (logged unless not `say_so`): onnxruntime then refuses sessions with pools of their own (the
    torch backend makes that pool when onnxruntime's kernels hold most of its quantized weights)."""
    import onnxruntime as ort

    # on the CPU alone, onnxruntime's fallback would only retry the same provider after printing the error
    fallback = int(providers != ["CPUExecutionProvider"])
    try:
        return ort.InferenceSession(model, options, providers=providers, enable_fallback=fallback)
    except RuntimeError as error:
        if "global thread pool" not in str(error):
            raise
    if say_so:
        log.info("onnxruntime's process-wide thread pool is in use in this process: this session runs on it")
    options.use_per_session_threads = False
    return ort.InferenceSession(model, options, providers=providers, enable_fallback=fallback)


@functools.cache
def qmoe_supported() -> bool:
    """Whether the installed onnxruntime runs `QMoE` as both backends build it (float32 activations, SwiGLU with
    gate and up interleaved, block-wise scales, accuracy_level, 4 and 8 bits): its CPU kernel gained these over
    several releases. Probed once with two-expert nodes whose outputs are checked against numpy."""
    try:
        import onnxruntime  # noqa: F401
        from onnx import helper  # noqa: F401
    except ImportError:
        return False
    return all(_qmoe_probe(bits) for bits in (4, 8))


@functools.cache
def qmoe_router_weights_supported() -> bool:
    """Whether `QMoE` also takes `router_weights` (its fifteenth input, newer than the rest): it chooses the top k
    by `router_probs` and weights the chosen experts by `router_weights` at them, renormalized over the k. ERNIE
    chooses by softmax + correction bias and weights by the softmax alone: with this input a layer feeds both as
    they are, without it the chosen experts' logits are scattered over a masked row (`QMoE` then takes the softmax
    of that for both). Probed once with three-expert nodes (top 2) checked against numpy."""
    return qmoe_supported() and all(_qmoe_probe(bits, router_weights=True) for bits in (4, 8))


def _qmoe_probe(bits: int, router_weights: bool = False) -> bool:
    """Without `router_weights`: two experts, top 1, the router choosing expert 1. With it: three experts, top 2,
    `router_probs` choosing experts 1 and 2 and `router_weights` weighting them 0.25 and 0.75."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    hidden = inter = block = 16
    experts, top_k = (3, 2) if router_weights else (2, 1)
    per_byte, offset = 8 // bits, 2 ** (bits - 1)
    rng = np.random.default_rng(0)
    fc1 = rng.integers(0, 256, (experts, 2 * inter, hidden // per_byte), dtype=np.uint8)  # [E, 2I, H*bits/8]
    fc2 = rng.integers(0, 256, (experts, hidden, inter // per_byte), dtype=np.uint8)  # [E, H, I*bits/8]
    s1 = np.full((experts, 2 * inter, 1), 0.01, np.float32)
    s2 = np.full((experts, hidden, 1), 0.01, np.float32)
    inputs = ["x", "router", "fc1", "s1", "", "fc2", "s2"]
    widths = [("x", hidden), ("router", experts)]
    if router_weights:  # input 14, after the biases, fc3 and zero points left out
        inputs += [""] * 7 + ["weights"]
        widths.append(("weights", experts))
    node = helper.make_node(
        "QMoE", inputs, ["y"], domain=MS_DOMAIN, k=top_k,
        activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1, expert_weight_bits=bits,
        block_size=block, accuracy_level=0, activation_alpha=1.0, activation_beta=0.0,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["T", w]) for n, w in widths],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])],
        [numpy_helper.from_array(a, n) for a, n in ((fc1, "fc1"), (s1, "s1"), (fc2, "fc2"), (s2, "s2"))],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    x = rng.normal(0, 1, (1, hidden)).astype(np.float32)
    feed = {"x": x, "router": np.array([[0.0, 5.0, 4.0][:experts]], np.float32)}
    if router_weights:
        feed["weights"] = np.array([[0.5, 0.1, 0.3]], np.float32)  # chosen 1 and 2: 0.25 and 0.75 once renormalized
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:  # on onnxruntime's process-wide pool where this process has one
        session = inference_session(model.SerializeToString(), options, ["CPUExecutionProvider"], say_so=False)
        (y,) = session.run(None, feed)
    except Exception:  # noqa: BLE001 - any refusal (unknown op, attribute, input, layout) means: not this onnxruntime
        return False

    def dequantize_expert(packed: np.ndarray) -> np.ndarray:  # [N, K*bits/8] -> [N, K]
        codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(packed.shape[0], -1) if bits == 4 else packed
        return (codes.astype(np.float32) - offset) * 0.01

    def expert(e: int) -> np.ndarray:  # [H]
        gate_up = dequantize_expert(fc1[e]) @ x[0]
        gate, up = gate_up[0::2], gate_up[1::2]  # interleaved rows
        return dequantize_expert(fc2[e]) @ (gate / (1 + np.exp(-gate)) * up)

    # top 1: expert 1 alone, its routing weight 1 after normalizing
    expected = 0.25 * expert(1) + 0.75 * expert(2) if router_weights else expert(1)
    # 8-bit experts round their activations to int8 whatever the accuracy_level: a loose bound for them
    tolerance = 1e-4 if bits == 4 else 0.05 * float(np.abs(expected).max())
    return bool(np.allclose(y[0], expected, rtol=1e-4, atol=tolerance))
