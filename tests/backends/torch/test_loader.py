"""Checkpoint loading errors name the tensor; MTP tensors are ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch.loader import CheckpointError


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
