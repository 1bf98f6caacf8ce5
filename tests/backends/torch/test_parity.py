"""Greedy tokens and logprobs of ernie-serve's own ERNIE 4.5 equal transformers' on tiny real checkpoints."""

from __future__ import annotations

import pytest
import torch

from ernie_serve import LLM, SamplingParams
from ernie_serve.testing.checkpoints import TINY_SHAPES, load_reference, reference_greedy, reference_logprobs

# several lengths in one batch: shorter than a block, several blocks, and a chunked-prefill-sized one
PROMPTS = [[5, 6, 7], list(range(10, 31)), [100] * 9 + [7, 8], [300, 301], list(range(40, 90))]
NEW_TOKENS = 8


def assert_matches_reference(reference, prompt: list[int], completion) -> None:
    """Greedy tokens equal transformers', and each token's logprob is transformers' and ranks first."""
    assert completion.token_ids == reference_greedy(reference, prompt, NEW_TOKENS)
    assert completion.finish_reason == "length"
    entries = list(zip(completion.logprobs, completion.token_ids, strict=True))
    ours = [entry[token].logprob for entry, token in entries]
    assert ours == pytest.approx(reference_logprobs(reference, prompt, completion.token_ids), abs=1e-3)
    assert all(entry[token].rank == 1 for entry, token in entries)


ENGINE_OPTIONS = {
    # 24 tokens a step: chunked prefill, prefix continuation and small steps (the MoE's few-token path)
    "chunked": {"max_num_batched_tokens": 24},
    # every prompt prefilled in one step (one GEMM per expert)
    "one-step-prefill": {"max_num_batched_tokens": 256},
    # the same without oneDNN-repacked weights: MKL's GEMMs
    "no-prepack": {"max_num_batched_tokens": 256, "backend_options": {"cpu_weight_prepack": False}},
}


@pytest.mark.parametrize("options", list(ENGINE_OPTIONS))
@pytest.mark.parametrize("disk_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_greedy_and_logprobs_match_transformers(
    tiny_checkpoint, shape: str, disk_dtype: torch.dtype, options: str
) -> None:
    checkpoint = tiny_checkpoint(shape, disk_dtype)
    # a small block size puts block boundaries inside every prompt
    llm = LLM(model=str(checkpoint), block_size=4, **ENGINE_OPTIONS[options])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)

    reference = load_reference(checkpoint)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert_matches_reference(reference, prompt, output.outputs[0])


def test_tiny_checkpoints_are_sharded_with_selection_bias(tiny_checkpoint) -> None:
    """The fixture itself must produce what the parity test claims to cover."""
    import json

    from safetensors import safe_open

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    name = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    with safe_open(str(checkpoint / index["weight_map"][name]), "pt") as reader:
        assert reader.get_tensor(name).abs().sum() > 0


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_single_request_decode_matches_transformers(tiny_checkpoint, shape: str) -> None:
    """A request alone decodes one token per step: single-row products and the MoE's one-token case."""
    checkpoint = tiny_checkpoint(shape, torch.float32)
    llm = LLM(model=str(checkpoint), block_size=4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    reference = load_reference(checkpoint)
    for prompt in (PROMPTS[1], PROMPTS[3]):
        assert_matches_reference(reference, prompt, llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0])
