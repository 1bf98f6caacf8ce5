"""What the benchmarks run: the CPU benchmark model, and the request sets (the mixed offline workload and
vLLM's random dataset), shared by `bench throughput`, `bench serve` and the GPU check."""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from ernie_serve.core.config import ModelConfig
from ernie_serve.demo import cache_root, write_random_checkpoint
from ernie_serve.demo_tokenizer import DEMO_MARKUP, DEMO_SPECIAL_TOKENS, build_demo_tokenizer

# Token ids below this are ERNIE's special tokens (<unk>, <s>, </s>, <|begin_of_sentence|>, ...): random
# prompts never contain them, so a prompt cannot end early or change the chat structure.
FIRST_ORDINARY_TOKEN = 10

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
    """One benchmark request: prompt token ids (so input lengths are exact) and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


def mixed_workload(
    num_requests: int = 48,
    prompt_lens: tuple[int, int] = (16, 256),
    output_lens: tuple[int, int] = (16, 128),
    vocab: int = 2000,
    seed: int = 0,
) -> list[BenchRequest]:
    """Random prompts with lengths spread uniformly over the given ranges (inclusive): `bench throughput`'s
    default workload. The same arguments give the same requests (the recorded figures depend on it)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*prompt_lens)
        prompt = [rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(prompt_len)]
        requests.append(BenchRequest(prompt, rng.randint(*output_lens)))
    return requests


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    vocab_size: int = 1000,
    seed: int = 0,
) -> list[BenchRequest]:
    """vLLM's random dataset: lengths uniform in [len * (1 - ratio), len * (1 + ratio)], random token ids
    in [FIRST_ORDINARY_TOKEN, vocab_size). The same arguments give the same requests."""
    if not 0 <= range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    if vocab_size <= FIRST_ORDINARY_TOKEN:
        raise ValueError(f"--random-vocab-size must be larger than {FIRST_ORDINARY_TOKEN}")
    rng = random.Random(seed)

    def length(center: int) -> int:
        low, high = max(1, int(center * (1 - range_ratio))), max(1, int(center * (1 + range_ratio)))
        return rng.randint(low, high)

    requests = []
    for _ in range(num_prompts):
        n_in, n_out = length(input_len), length(output_len)
        prompt = [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(n_in)]
        requests.append(BenchRequest(prompt, n_out))
    return requests


def bench_checkpoint(seed: int = 0) -> Path:
    """The CPU benchmark model as a real checkpoint on disk (random fp32 weights, demo tokenizer), built once
    into the cache; concurrent first calls are safe (each builds aside and renames into place)."""
    target = cache_root() / f"bench-moe-70m-s{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="bench-", dir=target.parent))
    write_random_checkpoint(staging, BENCH_MODEL, seed=seed, dtype=torch.float32, std=0.05)
    build_demo_tokenizer(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_word_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """A benchmark tokenizer in which every id is a word (`w123`), so every generated token is streamed text.

    Random-weight models pick ids all over their vocabulary; with the 2048-piece demo tokenizer most of a
    32000-id model's tokens decode to nothing, no chunk is sent for them, and the HTTP path looks cheaper than
    it is with a real model. ERNIE's special tokens keep their ids 0..9 and its markup tags take the last ids,
    as in the demo tokenizer (whose config names them); `tokenizer_config.json` is written too (special tokens,
    chat template)."""
    out = Path(out_dir)
    build_demo_tokenizer(out)  # for tokenizer_config.json; tokenizer.json is replaced below
    specials = [*DEMO_SPECIAL_TOKENS, *DEMO_MARKUP]
    vocab = {token: i for i, token in enumerate(DEMO_SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size - len(DEMO_MARKUP))})
    vocab.update({tag: vocab_size - len(DEMO_MARKUP) + k for k, tag in enumerate(DEMO_MARKUP)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(out / "tokenizer.json"))
