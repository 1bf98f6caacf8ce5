"""The TensorRT flavour of the ONNX graph, without TensorRT: in float32 it runs in onnxruntime through the onnx
backend (`--onnx-graph-flavour tensorrt`) and must pass the conformance suite and match the torch backend; in
bfloat16/float16 it must be a valid graph typed as TensorRT builds it. onnxruntime's CPU kernels have no
bfloat16 arithmetic (MatMul, Add, Mul, Softmax all lack a bfloat16 CPU kernel), so the bfloat16 graph is run by
onnx's reference evaluator instead; the float16 one runs in onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ernie_serve.backends.onnx.export import build_torch_model  # noqa: E402
from ernie_serve.backends.onnx.graph import (  # noqa: E402
    BFLOAT16,
    FLOAT,
    MASKED,
    bfloat16_bits,
    build_graph,
    new_names,
    past_names,
)
from ernie_serve.models import read_model_config  # noqa: E402
from ernie_serve.testing.checkpoints import TINY_SHAPES  # noqa: E402
from ernie_serve.testing.conformance import PROMPTS, BackendConformance, conformance_cases  # noqa: E402

TRT_FLAVOUR = {"onnx_graph_flavour": "tensorrt"}
FLOAT32_WEIGHTS = ("gate.weight", "e_score_correction_bias", "rope.inv_freq")  # stay float32 in every dtype


@pytest.fixture(scope="module")
def conformance(tiny_checkpoint, tmp_path_factory):
    suite = BackendConformance(
        "onnx",
        tmp_path_factory.mktemp("trt-flavour-conformance"),
        checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16),
        **TRT_FLAVOUR,
    )
    yield suite
    suite.close()


@pytest.mark.parametrize("case", conformance_cases())
def test_conformance(conformance, case: str) -> None:
    """Greedy parity with transformers on every tiny shape, mixed batching, abort, preemption, seeds."""
    conformance.run_case(case)


def test_the_backend_really_runs_the_tensorrt_flavour(conformance) -> None:
    """The option reaches the export: the session's graph routes densely (no NonZero, no ScatterND)."""
    backend = conformance.llm("moe_shared_tied").engine.core.backend
    model = onnx.load(str(backend.graph_path), load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props} == {"flavour": "tensorrt", "dtype": "float32"}
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["NonZero"] == ops["ScatterND"] == 0 and ops["TopK"] > 0


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_greedy_tokens_and_logprobs_equal_the_torch_backend(tiny_checkpoint, shape: str) -> None:
    """Against our torch backend (float32 on CPU) rather than transformers: identical greedy tokens and
    chosen-token logprobs within 1e-4, for the conformance prompts batched under a small step budget."""
    from ernie_serve import LLM, SamplingParams

    checkpoint = str(tiny_checkpoint(shape, torch.bfloat16))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    requests = [{"prompt_token_ids": p} for p in PROMPTS]
    results = {}
    for backend, options in (("torch", {}), ("onnx", TRT_FLAVOUR)):
        with LLM(model=checkpoint, backend=backend, block_size=4, max_num_batched_tokens=24, **options) as llm:
            results[backend] = [o.outputs[0] for o in llm.generate(requests, params)]
    for i, (ours, theirs) in enumerate(zip(results["onnx"], results["torch"], strict=True)):
        assert ours.token_ids == theirs.token_ids, f"prompt {i}"
        ours_lp = [entry[t].logprob for entry, t in zip(ours.logprobs, ours.token_ids, strict=True)]
        theirs_lp = [entry[t].logprob for entry, t in zip(theirs.logprobs, theirs.token_ids, strict=True)]
        np.testing.assert_allclose(ours_lp, theirs_lp, atol=1e-4, rtol=0, err_msg=f"prompt {i}")


def test_tensorrt_flavour_refuses_quantization_in_the_onnx_backend(tiny_checkpoint) -> None:
    from ernie_serve import LLM

    with pytest.raises(ValueError, match="--onnx-graph-flavour tensorrt: the tensorrt graph has no quantized form"):
        LLM(
            model=str(tiny_checkpoint("moe_top1_dense_tail", torch.bfloat16)),
            backend="onnx",
            quantization="wint8",
            **TRT_FLAVOUR,
        )


def test_flavour_and_dtype_are_validated() -> None:
    from ernie_serve.backends.onnx.graph import GraphQuantization, check_flavour
    from ernie_serve.quantization import QuantSpec

    check_flavour("tensorrt", "bfloat16")
    with pytest.raises(ValueError, match="unknown ONNX graph flavour 'trt'"):
        check_flavour("trt", "float32")
    with pytest.raises(ValueError, match="unknown ONNX graph dtype 'int8'"):
        check_flavour("tensorrt", "int8")
    with pytest.raises(ValueError, match="onnxruntime graph computes in float32, not bfloat16"):
        check_flavour("onnxruntime", "bfloat16")
    with pytest.raises(ValueError, match="no quantized form"):
        check_flavour("tensorrt", "float32", GraphQuantization(QuantSpec.of("wint4", 128)))


def test_bfloat16_rounding_matches_torch() -> None:
    """Weights are rounded to nearest, ties to even, exactly as the torch backend's `.to(torch.bfloat16)`."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 0.05, 10_000), rng.normal(0, 1e4, 1000), [0.0, -0.0, 1.0, 65504.0]])
    values = values.astype(np.float32)
    ties = (np.arange(0, 64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway, odd and even
    values = np.concatenate([values, ties, -ties])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(values), expected)


# ----- the reduced-precision graphs -----


@pytest.fixture(scope="module")
def weights(tiny_checkpoint):
    """`shape -> (config, checkpoint weights)`, cached: the float32 source every graph here is built from."""
    made = {}

    def get(shape: str):
        if shape not in made:
            checkpoint = tiny_checkpoint(shape, torch.bfloat16)
            config = read_model_config(checkpoint)
            made[shape] = config, dict(build_torch_model(config, str(checkpoint), 0).checkpoint_targets())
        return made[shape]

    return get


def _feed(config, kv_dtype, batch: int = 2, seq: int = 3, past: int = 4) -> dict[str, np.ndarray]:
    """Random tokens continuing a random cache of `past` positions, causal among the new tokens."""
    rng = np.random.default_rng(0)
    causal = np.triu(np.full((seq, seq), MASKED, np.float32), 1)
    feed = {
        "input_ids": rng.integers(3, 500, (batch, seq)),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)),
        "attention_bias": np.concatenate([np.zeros((batch, seq, past), np.float32), np.stack([causal] * batch)], 2),
        "logits_index": np.array([seq - 1, seq - 2]),
    }
    for layer in range(config.num_hidden_layers):
        for name in past_names(layer):
            shape = (batch, config.num_key_value_heads, past, config.head_dim)
            feed[name] = rng.normal(0, 1, shape).astype(np.float32).astype(kv_dtype)
    return feed


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_bfloat16_graph_is_valid_and_typed_for_tensorrt(weights, shape: str) -> None:
    config, source = weights(shape)
    model, stats = build_graph(config, source, flavour="tensorrt", dtype="bfloat16")
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert {p.key: p.value for p in model.metadata_props} == {"flavour": "tensorrt", "dtype": "bfloat16"}
    types = {t.name: t.data_type for t in model.graph.initializer}
    weight_types = {name: kind for name, kind in types.items() if "const" not in name}
    for name, kind in weight_types.items():
        assert kind == (FLOAT if name.endswith(FLOAT32_WEIGHTS) else BFLOAT16), name
    embedding = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
    expected = bfloat16_bits(source["model.embed_tokens.weight"].float().numpy())
    assert np.frombuffer(embedding.raw_data, np.uint16).reshape(expected.shape).tolist() == expected.tolist()
    assert stats.full_precision_bytes < 0.6 * 4 * stats.num_parameters  # about 2 bytes a weight, not 4
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    for layer in range(config.num_hidden_layers):
        assert {inputs[n] for n in past_names(layer)} == {outputs[n] for n in new_names(layer)} == {BFLOAT16}
    assert inputs["attention_bias"] == outputs["logits"] == FLOAT
    assert inputs["input_ids"] == inputs["position_ids"] == inputs["logits_index"] == onnx.TensorProto.INT64


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_reduced_precision_graphs_compute_what_the_float32_graph_does(weights, shape: str) -> None:
    """float16 in onnxruntime, bfloat16 in onnx's reference evaluator (onnxruntime cannot): logits and new KV
    within each format's rounding of the float32 TensorRT-flavour graph's (logits here span about +-5)."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    config, source = weights(shape)
    float32, _ = build_graph(config, source, flavour="tensorrt", dtype="float32")
    session = ort.InferenceSession(float32.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, _feed(config, np.float32))
    half, _ = build_graph(config, source, flavour="tensorrt", dtype="float16")
    half_session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    brain, _ = build_graph(config, source, flavour="tensorrt", dtype="bfloat16")
    runs = {
        "float16": (half_session.run(None, _feed(config, np.float16)), 2e-2),
        "bfloat16": (ReferenceEvaluator(brain).run(None, _feed(config, ml_dtypes.bfloat16)), 1.5e-1),
    }
    for dtype, (got, tolerance) in runs.items():
        assert got[0].dtype == np.float32, dtype
        np.testing.assert_allclose(got[0], expected[0], atol=tolerance, rtol=0, err_msg=f"{dtype} logits")
        for ours, theirs in zip(got[1:], expected[1:], strict=True):
            np.testing.assert_allclose(ours.astype(np.float32), theirs, atol=tolerance, rtol=0, err_msg=dtype)


def test_each_flavour_and_dtype_is_an_export_of_its_own(tiny_checkpoint) -> None:
    from ernie_serve.backends.onnx.export import ExportOptions, export_key

    checkpoint = tiny_checkpoint("moe_top1_dense_tail", torch.bfloat16)
    config = read_model_config(checkpoint)
    variants = [ExportOptions(), ExportOptions(graph_flavour="tensorrt")]
    variants += [ExportOptions(graph_flavour="tensorrt", dtype=dtype) for dtype in ("bfloat16", "float16")]
    keys = {export_key(config, str(checkpoint), 0, options)[0] for options in variants}
    assert len(keys) == len(variants)
