"""The exported graph itself: valid ONNX, dynamic axes, sparse expert dispatch, and the same numbers as our
torch model for padded batches with per-sequence caches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ernie_serve.backends.onnx.export import export_to_dir  # noqa: E402
from ernie_serve.backends.onnx.graph import MASKED, new_names, past_names  # noqa: E402
from ernie_serve.models import num_parameters, read_model_config  # noqa: E402


@pytest.fixture(scope="module", params=["moe_interval2_untied_mqa", "dense_bias_headdim"])
def exported(request, tiny_checkpoint, tmp_path_factory):
    checkpoint = tiny_checkpoint(request.param, torch.bfloat16)
    config = read_model_config(checkpoint)
    out = tmp_path_factory.mktemp(f"graph-{request.param}")
    stats = export_to_dir(config, str(checkpoint), out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return config, checkpoint, out, stats, session


def test_graph_is_valid_with_external_weights_and_dynamic_axes(exported) -> None:
    config, _, out, stats, _ = exported
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert (out / "model.onnx.data").stat().st_size >= stats.external_bytes > 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    k, d = config.num_key_value_heads, config.head_dim
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["attention_bias"] == ["batch", "seq", "total"]
    assert inputs[past_names(0)[0]] == ["batch", k, "past", d]
    assert outputs["logits"] == ["batch", config.vocab_size]
    assert outputs[new_names(config.num_hidden_layers - 1)[1]] == ["batch", k, "seq", d]
    assert stats.num_parameters == pytest.approx(num_parameters(config), rel=0.01)


def test_moe_layers_gather_and_scatter_per_expert(exported) -> None:
    """Each expert runs on the tokens NonZero picked for it: one NonZero and one ScatterND per expert per MoE
    layer, and the expert MatMuls take gathered rows, never the full token batch."""
    config, _, out, _, _ = exported
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    assert ops["NonZero"] == ops["ScatterND"] == moe_layers * config.moe_num_experts
    assert ops["TopK"] == moe_layers
    assert "Loop" not in ops and "If" not in ops
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "MatMul" and ".experts." in node.input[1] and "gate_up" in node.input[1]:
            assert producers[node.input[0]].op_type == "Gather"


def _run_graph(session, config, tokens: list[int], past: list[np.ndarray] | None, start: int):
    """One sequence alone, no padding."""
    n = len(tokens)
    feed = {
        "input_ids": np.array([tokens]),
        "position_ids": np.arange(start, start + n)[None],
        "attention_bias": np.concatenate(
            [np.zeros((1, n, start), np.float32), np.triu(np.full((n, n), MASKED, np.float32), 1)[None]], axis=2
        ),
        "logits_index": np.array([n - 1]),
    }
    for layer in range(config.num_hidden_layers):
        for j, name in enumerate(past_names(layer)):
            feed[name] = (
                past[2 * layer + j]
                if past
                else np.zeros((1, config.num_key_value_heads, 0, config.head_dim), np.float32)
            )
    outputs = session.run(None, feed)
    return outputs[0][0], outputs[1:]


def test_padded_batch_with_caches_matches_each_sequence_alone(exported) -> None:
    """Three sequences with different cached lengths and new-token counts, right-padded into one batch."""
    config, _, _, _, session = exported
    layers, k, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    rng = np.random.default_rng(0)
    history = [rng.integers(3, 500, size=p).tolist() for p in (5, 0, 9)]
    new = [rng.integers(3, 500, size=s).tolist() for s in (3, 4, 1)]
    caches, expected = [], []
    for hist, toks in zip(history, new, strict=True):
        past = None
        if hist:
            _, past = _run_graph(session, config, hist, None, 0)
        caches.append(past)
        logits, _ = _run_graph(session, config, toks, past, len(hist))
        expected.append(logits)

    batch, seq, width = 3, max(map(len, new)), max(map(len, history))
    feed = {
        "input_ids": np.zeros((batch, seq), np.int64),
        "position_ids": np.zeros((batch, seq), np.int64),
        "attention_bias": np.full((batch, seq, width + seq), MASKED, np.float32),
        "logits_index": np.array([len(t) - 1 for t in new]),
    }
    feed["attention_bias"][:, :, width:] = np.triu(np.full((seq, seq), MASKED, np.float32), 1)
    for layer in range(layers):
        for name in past_names(layer):
            feed[name] = np.zeros((batch, k, width, d), np.float32)
    for b, (hist, toks, past) in enumerate(zip(history, new, caches, strict=True)):
        feed["input_ids"][b, : len(toks)] = toks
        feed["position_ids"][b] = np.arange(len(hist), len(hist) + seq)
        feed["attention_bias"][b, :, : len(hist)] = 0
        for layer in range(layers):
            for j, name in enumerate(past_names(layer)):
                if past:
                    feed[name][b, :, : len(hist)] = past[2 * layer + j][0]
    logits = session.run(None, feed)[0]
    for b in range(batch):
        np.testing.assert_allclose(logits[b], expected[b], atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_matches_transformers(exported) -> None:
    """Logits of a prompt, then of one more token read against the returned cache, equal transformers'."""
    from ernie_serve.testing.checkpoints import load_reference

    config, checkpoint, _, _, session = exported
    tokens = [7, 8, 9, 10, 11, 12, 13]
    with torch.no_grad():
        reference = load_reference(checkpoint)(torch.tensor([tokens])).logits[0].numpy()  # [n, V]
    prefill, cache = _run_graph(session, config, tokens[:-1], None, 0)
    np.testing.assert_allclose(prefill, reference[-2], atol=1e-4, rtol=1e-4)
    decode, new = _run_graph(session, config, tokens[-1:], cache, len(tokens) - 1)
    np.testing.assert_allclose(decode, reference[-1], atol=1e-4, rtol=1e-4)
    assert new[0].shape == (1, config.num_key_value_heads, 1, config.head_dim)
