"""Checkpoint loading: -Paddle checkpoints load to the same model as their -PT originals; errors name the tensor
as it is on disk; MTP tensors are ignored."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch.backend import TorchBackend, TorchOptions
from ernie_serve.backends.torch.loader import CheckpointError
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.plan import ScheduledRequest, StepPlan
from ernie_serve.models import read_model_config
from ernie_serve.testing.checkpoints import TINY_SHAPES

PROMPTS = [[5, 6, 7], list(range(10, 31)), [300, 301, 2, 9]]


def _single_file_copy(checkpoint: Path, out: Path, edit) -> Path:
    """Copy a sharded checkpoint into one model.safetensors after `edit(tensors)`."""
    shutil.copytree(checkpoint, out)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (out / "model.safetensors.index.json").unlink()
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_single_file_checkpoint_loads_and_ignores_mtp(tiny_checkpoint, tmp_path: Path) -> None:
    source = tiny_checkpoint("moe_shared_tied", torch.bfloat16)

    def add_mtp(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.mtp_block.0.input_layernorm.weight"] = torch.ones(64)
        tensors["model.mtp_linear_proj.0.weight"] = torch.ones(64, 128)

    path = _single_file_copy(source, tmp_path / "ckpt", add_mtp)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ours = LLM(model=str(path)).generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs[0].token_ids
    sharded = LLM(model=str(source)).generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs[0].token_ids
    assert ours == sharded


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"), "model.layers.0.self_attn.k_proj.weight"),
        (
            lambda t: t.__setitem__("model.layers.0.extra.weight", torch.ones(2)),
            "model.layers.0.extra.weight",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(65)),
            "'model.norm.weight' in model.safetensors has shape (65,), expected (64,)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_checkpoint_errors_name_the_tensor(tiny_checkpoint, tmp_path: Path, edit, message: str) -> None:
    path = _single_file_copy(tiny_checkpoint("moe_shared_tied", torch.bfloat16), tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(model=str(path))


def test_unsupported_model_type_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        LLM(model=str(tmp_path))


def _prefill_logits(checkpoint: Path, block_size: int = 4) -> torch.Tensor:
    """The backend's float32 logits at the last position of each of PROMPTS, prefilled together in one step."""
    backend = TorchBackend()
    settings = EngineSettings(model=str(checkpoint), device="cpu")
    backend.load(read_model_config(checkpoint), settings, str(checkpoint), TorchOptions())
    backend.allocate_kv_cache(num_blocks=32, block_size=block_size)
    scheduled, next_block = [], 0
    for i, prompt in enumerate(PROMPTS):
        blocks = list(range(next_block, next_block + -(-len(prompt) // block_size)))
        next_block += len(blocks)
        scheduled.append(ScheduledRequest(f"r{i}", prompt, 0, blocks, is_new=True, samples=True))
    logits = backend.execute(StepPlan(scheduled)).float()  # [len(PROMPTS), V]
    backend.close()
    return logits


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_paddle_checkpoint_serves_like_its_pt_original(tiny_checkpoint, paddle_checkpoint, shape: str) -> None:
    """Every tiny shape (MoE variants, tied and untied heads, biases) rewritten in the -Paddle layout."""
    pt, paddle = tiny_checkpoint(shape, torch.bfloat16), paddle_checkpoint(shape)
    torch.testing.assert_close(_prefill_logits(paddle), _prefill_logits(pt), rtol=0, atol=1e-5)

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(model=str(pt)) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(requests, params)]
    with LLM(model=str(paddle)) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(requests, params)] == expected


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("ernie.layers.1.mlp.experts.0.up_gate_proj.weight"),
            "is missing tensor 'ernie.layers.1.mlp.experts.0.up_gate_proj.weight'",
        ),
        (
            lambda t: t.__setitem__("ernie.layers.0.extra.weight", torch.ones(2, 3)),
            "unexpected tensor 'ernie.layers.0.extra.weight' (read as 'model.layers.0.extra.weight') "
            "in model.safetensors",
        ),
        (
            lambda t: t.__setitem__("ernie.layers.0.self_attn.o_proj.weight", torch.ones(64, 65)),
            "tensor 'ernie.layers.0.self_attn.o_proj.weight' (read as 'model.layers.0.self_attn.o_proj.weight') "
            "in model.safetensors has shape (65, 64), expected (64, 64)",
        ),
        (
            lambda t: t.__setitem__("ernie.layers.0.self_attn.qkv_proj.weight", torch.ones(64, 100)),
            "fused tensor 'ernie.layers.0.self_attn.qkv_proj.weight' "
            "(read as 'model.layers.0.self_attn.qkv_proj.weight') in model.safetensors "
            "has shape (64, 100): its q | k | v width should be 128 (64 + 32 + 32)",
        ),
    ],
    ids=["missing-fused", "unexpected", "shape", "fused-width"],
)
def test_bad_paddle_checkpoint_errors_name_the_tensor_on_disk(
    paddle_checkpoint, tmp_path: Path, edit, message: str
) -> None:
    path = _single_file_copy(paddle_checkpoint("moe_shared_tied"), tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        LLM(model=str(path))
