"""Tensor and expert parallelism on CPU over gloo, two processes on 127.0.0.1: the same greedy tokens and
logprobs as one process, half the weights per rank, and checkpoints that cannot be split refused at start-up."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch.distributed import ParallelStartError
from ernie_serve.backends.torch.parallel import ParallelConfigError, ParallelLayout, split_weight_bytes
from ernie_serve.backends.torch.quant import QuantizedWeight
from ernie_serve.checkpoint import CheckpointError, CheckpointSlicer
from ernie_serve.core.config import ModelConfig
from ernie_serve.models import read_model_config
from ernie_serve.quantization import QuantSpec

# a shared 40-token prefix (prefix-cache hits), prompts longer than a step (chunked prefill)
SYSTEM = list(range(100, 140))
PROMPTS = [SYSTEM + [5, 6, 7], list(range(10, 31)), SYSTEM + [8, 9], [300, 301], list(range(40, 90)), [7] * 30]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
# block size 4, 16 tokens a step, 28 KV blocks (112 tokens) for ~260 wanted: chunked prefill, prefix caching
# and preemption all happen
ENGINE = dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks_override=28, enable_prefix_caching=True)


@pytest.fixture(autouse=True)
def one_thread_per_rank() -> Iterator[None]:
    """Each rank computes with the engine process's thread count: one, so two ranks share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(model: str, **settings) -> tuple[list[list[int]], list[list[float]], int]:
    """Greedy tokens, their logprobs, and the number of preemptions, of PROMPTS."""
    with LLM(model=model, **ENGINE, **settings) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        stats = llm.engine.core.scheduler.stats()
        assert stats.prefix_cache_hits > 0
    tokens = [o.outputs[0].token_ids for o in outputs]
    logprobs = [
        [e[t].logprob for e, t in zip(o.outputs[0].logprobs, tokens[i], strict=True)] for i, o in enumerate(outputs)
    ]
    return tokens, logprobs, stats.num_preemptions


CASES = {
    # shape, disk layout, expert parallelism
    "moe-tp": ("moe_shared_tied", "pt", False),
    "moe-ep": ("moe_shared_tied", "pt", True),
    "one-kv-head": ("moe_interval2_untied_mqa", "pt", False),  # 1 KV head on 2 ranks: replicated
    "one-kv-head-paddle": ("moe_interval2_untied_mqa", "paddle", False),
    "top1-dense-tail-ep": ("moe_top1_dense_tail", "pt", True),
    "dense": ("dense_bias_headdim", "pt", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_tokens_and_logprobs_of_one(tiny_checkpoint, paddle_checkpoint, case: str) -> None:
    shape, layout, expert_parallel = CASES[case]
    checkpoint = str(paddle_checkpoint(shape) if layout == "paddle" else tiny_checkpoint(shape, torch.bfloat16))
    tokens, logprobs, preempted = _generate(checkpoint)
    parallel = _generate(checkpoint, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    assert preempted > 0 and parallel[2] > 0
    assert parallel[0] == tokens
    for ours, theirs in zip(parallel[1], logprobs, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-4)


@pytest.mark.parametrize(
    ("shape", "settings"),
    [
        ("moe_shared_tied", {}),
        ("moe_shared_tied", {"enable_expert_parallel": True}),
        ("moe_interval2_untied_mqa", {}),
        ("dense_bias_headdim", {}),
        ("moe_shared_tied", {"quantization": "wint8"}),
    ],
    ids=["moe-tp", "moe-ep", "one-kv-head", "dense", "wint8"],
)
def test_each_rank_holds_about_half_the_split_weights(tiny_checkpoint, shape: str, settings: dict) -> None:
    """Measured on the loaded models: rank 0's in this process, rank 1's as it reported after loading."""
    checkpoint = str(tiny_checkpoint(shape, torch.float32))
    quant = {k: v for k, v in settings.items() if k == "quantization"}
    with LLM(model=checkpoint, **quant) as whole:
        model = whole.engine.core.backend.model
        one = split_weight_bytes(model)
    with LLM(model=checkpoint, tensor_parallel_size=2, **settings) as sharded:
        backend = sharded.engine.core.backend
        assert backend.rank_weight_bytes[0]["split"] == split_weight_bytes(backend.model)["split"]
        per_rank = {r: b["split"] for r, b in backend.rank_weight_bytes.items()}
        replicated = {r: b["replicated"] for r, b in backend.rank_weight_bytes.items()}
    assert sorted(per_rank) == [0, 1]
    for rank, split in per_rank.items():
        assert split <= 0.55 * one["split"], (rank, split, one)
        assert replicated[rank] == one["replicated"]


def _config(**fields) -> ModelConfig:
    base = dict(
        model_type="ernie4_5_moe",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        moe_intermediate_size=32,
        moe_k=2,
        moe_num_experts=6,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    )
    return ModelConfig(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "world", "expert_parallel", "message"),
    [
        ({}, 3, False, "8 attention heads do not split evenly over 3 ranks"),
        ({"num_attention_heads": 12, "num_key_value_heads": 3}, 4, False, "3 KV heads can be neither split"),
        ({}, 4, True, "6 routed experts do not split evenly over 4 ranks"),
        ({"moe_intermediate_size": 30, "moe_num_shared_experts": 2}, 4, False, "moe_intermediate_size 30"),
        ({"intermediate_size": 90}, 4, True, "intermediate_size 90 does not split"),
    ],
)
def test_a_checkpoint_that_does_not_split_is_refused_in_one_line(fields, world, expert_parallel, message) -> None:
    with pytest.raises(ParallelConfigError, match=message) as error:
        ParallelLayout.plan(_config(**fields), 0, world, expert_parallel)
    assert "\n" not in str(error.value)


def test_kv_heads_split_when_they_divide_else_each_rank_keeps_the_one_its_queries_read() -> None:
    split = [ParallelLayout.plan(_config(), r, 2, False) for r in range(2)]
    assert [(lay.heads, lay.kv_heads) for lay in split] == [((0, 4), (0, 1)), ((4, 8), (1, 2))]
    replicated = [ParallelLayout.plan(_config(), r, 4, False) for r in range(4)]
    assert [lay.kv_heads for lay in replicated] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    experts = [ParallelLayout.plan(_config(), r, 2, True).experts for r in range(2)]
    assert experts == [(0, 3), (3, 6)]


def test_the_engine_refuses_before_starting_any_worker(tiny_checkpoint) -> None:
    checkpoint = str(tiny_checkpoint("moe_interval2_untied_mqa", torch.float32))  # 5 experts
    with pytest.raises(ParallelConfigError, match="5 routed experts do not split evenly over 2 ranks"):
        LLM(model=checkpoint, tensor_parallel_size=2, enable_expert_parallel=True)
    # nothing was left running: a parallel engine starts right after
    with LLM(model=checkpoint, tensor_parallel_size=2, max_num_batched_tokens=16) as llm:
        assert llm.generate({"prompt_token_ids": [5, 6]}, PARAMS)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
def test_with_quantization_each_rank_quantizes_its_own_slice(tiny_checkpoint, scheme: str) -> None:
    """Column-parallel slices (q/k/v) keep TP=1's per-output-channel codes and scales exactly; a row-parallel
    slice (o_proj) is quantized as the slice alone: its scales come from this rank's input channels."""
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.float32)
    spec = QuantSpec.of(scheme, 128)
    exact = {"exact_quantized_kernels": True}  # keeps the row-wise codes that `dequantized` reads
    with LLM(model=str(checkpoint), quantization=scheme, **exact) as whole:
        attn = whole.engine.core.backend.model.layers[0].attn
        whole_qkv, whole_o = attn.qkv_weight.dequantized(), attn.o_weight.dequantized()  # [(Q+2K)*D, H], [H, Q*D]
    with LLM(model=str(checkpoint), quantization=scheme, tensor_parallel_size=2, **exact) as sharded:
        assert sharded.generate({"prompt_token_ids": [5, 6, 7]}, PARAMS)[0].outputs[0].finish_reason == "length"
        attn = sharded.engine.core.backend.model.layers[0].attn
        qkv, o = attn.qkv_weight.dequantized(), attn.o_weight.dequantized()  # [(Q+2K)*D/2, H], [H, Q*D/2]
    config = read_model_config(checkpoint)
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    assert torch.equal(qkv[: q // 2], whole_qkv[: q // 2])  # rank 0's query heads
    assert torch.equal(qkv[q // 2 : q // 2 + kv // 2], whole_qkv[q : q + kv // 2])  # its KV head
    with CheckpointSlicer(checkpoint, config) as reader:
        expected = QuantizedWeight(1, q // 2, config.hidden_size, spec, torch.device("cpu"))
        expected.fill(
            0, slice(0, config.hidden_size), reader.read("model.layers.0.self_attn.o_proj.weight", 1, 0, q // 2)
        )
    assert torch.equal(o, expected.dequantized())
    assert not torch.equal(o, whole_o[:, : q // 2])  # (so the check tells the two ways apart)


def test_moe_layers_in_one_onnxruntime_session_add_their_residual_once(tiny_checkpoint, first_tokens_agree) -> None:
    """With onnxruntime's kernels each MoE layer's feed-forward half is one session on each rank
    (`MoELayerKernel`), and each attention's input half another (`AttentionInputKernel`); only the first rank's
    layer session adds the residual before the ranks' sums are added, so TP=2
    decodes as TP=1 does (the ranks' narrower experts take smaller activation blocks: close, not equal)."""
    from ernie_serve.backends.torch.model import SparseMoE
    from ernie_serve.ort_contrib import qmoe_supported

    pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    if not qmoe_supported():
        pytest.skip("this onnxruntime has no QMoE as the kernel uses it (the layers then keep one session an expert)")
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.float32))
    settings = dict(quantization="wint8", cpu_quantized_kernels="onnxruntime")
    threads = torch.get_num_threads()
    try:
        whole = LLM(model=checkpoint, **settings)
        with whole, LLM(model=checkpoint, tensor_parallel_size=2, **settings) as tp:
            model = tp.engine.core.backend.model  # rank 0's
            moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
            assert moes and all(m.layer_kernel is not None and m.adds_residual for m in moes)
            # each rank's norm, q|k|v and RoPE in one session over its own heads; the output projection stays
            # outside the layer's session: the ranks' partial products are summed before the norm
            assert all(layer.attn.input_kernel is not None for layer in model.layers)
            assert not any(m.layer_kernel.takes_attention for m in moes)
            whole_moes = [m for m in whole.engine.core.backend.model.modules() if isinstance(m, SparseMoE)]
            assert all(m.layer_kernel.takes_attention for m in whole_moes)  # one device: it starts there
            first_tokens_agree(tp, whole, 0.05)
    finally:
        torch.set_num_threads(threads)  # (a model on onnxruntime's kernels runs torch on one thread)


def test_a_worker_that_fails_to_load_fails_the_start_naming_its_rank(tiny_checkpoint, tmp_path) -> None:
    """Expert 4 of layer 1 lives on rank 1 only (experts 3..5 with expert parallelism): without it, rank 0
    loads and rank 1 does not; the engine fails with rank 1's own error, and takes the group down."""
    source = tiny_checkpoint("moe_shared_tied", torch.float32)
    missing = "model.layers.1.mlp.experts.4.down_proj.weight"
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"].pop(missing)
    tensors = load_file(shard)
    del tensors[missing]
    save_file(tensors, str(shard))
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    settings = dict(tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ParallelStartError, match=f"rank 1 failed while loading: .*missing tensor '{missing}'"):
        LLM(model=str(broken), **settings)
    with LLM(model=str(source), **settings) as llm:  # the group was taken down: a new one starts
        assert llm.generate({"prompt_token_ids": [5, 6]}, PARAMS)[0].outputs[0].finish_reason == "length"


def test_a_tensor_of_the_wrong_shape_is_refused_before_slicing(tiny_checkpoint, tmp_path) -> None:
    """A truncated vocabulary would otherwise be read as a short last slice and padded."""
    source = tiny_checkpoint("moe_shared_tied", torch.float32)
    broken = tmp_path / "short-vocab"
    shutil.copytree(source, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.embed_tokens.weight"
    shard = broken / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-10].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=f"'{name}' .* has shape \\(566, 64\\), expected \\(576, 64\\)"):
        LLM(model=str(broken), tensor_parallel_size=2)
