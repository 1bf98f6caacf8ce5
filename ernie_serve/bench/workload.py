"""The CPU benchmark model and the mixed offline workload, shared by the benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ernie_serve.core.config import ModelConfig

# ~70M parameters: the engine issue's CPU benchmark shape (hidden 512, 8 layers, 16 experts top-4, 1 shared).
BENCH_MODEL = ModelConfig(
    model_type="ernie4_5_moe",
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    moe_intermediate_size=256,
    moe_k=4,
    moe_num_experts=16,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=-1,
    moe_layer_interval=1,
    tie_word_embeddings=True,
    dtype="float32",
)


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def mixed_workload(
    num_requests: int = 48,
    prompt_lens: tuple[int, int] = (16, 256),
    output_lens: tuple[int, int] = (16, 128),
    vocab: int = 2000,
    seed: int = 0,
) -> list[BenchRequest]:
    """Random prompts with lengths spread uniformly over the given ranges (inclusive)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*prompt_lens)
        requests.append(BenchRequest([rng.randrange(10, vocab) for _ in range(prompt_len)], rng.randint(*output_lens)))
    return requests


def bench_checkpoint(seed: int = 0) -> Path:
    """The benchmark model as a real checkpoint on disk (random fp32 weights, demo tokenizer), built once."""
    import shutil
    import tempfile

    import torch

    from ernie_serve.demo import cache_root, write_random_checkpoint
    from ernie_serve.demo_tokenizer import build_demo_tokenizer

    target = cache_root() / f"bench-moe-70m-s{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="bench-", dir=target.parent))
    write_random_checkpoint(staging, BENCH_MODEL, seed=seed, dtype=torch.float32, std=0.05)
    build_demo_tokenizer(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
