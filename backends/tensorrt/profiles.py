"""TensorRT optimization profiles for the ERNIE graph (backends/onnx/graph.py): the (min, opt, max) shape of
every graph input, for a prefill profile and a decode profile.

Called when the engine is built (each profile gets an execution context) and when its cache key is computed;
`select_profile` is called each step to pick the profile a batch runs under. Pure functions of the model
config and the engine limits.

Every dimension of every input follows from four numbers: B sequences, S new tokens each (right-padded), P
cached tokens each (right-padded), and P + S, the width of `attention_bias`. The three shapes of a profile are
each a consistent point (P + S is the same in `attention_bias` as in the KV and token inputs), since TensorRT
checks the network's shapes at each of them.

- prefill (`PREFILL`): many tokens. S up to `min(max_batch_tokens, max_model_len)`, and B only up to as many
  such chunks as fit in `max_batch_tokens` (usually 1): TensorRT sizes activation memory for the max shape,
  B * S rows, and this keeps it at the step's token budget. Tuned (opt) for one full chunk of a new prompt
  (P = 0), where prefill time goes.
- decode (`DECODE`): many sequences, one token each. S = 1, B up to `min(max_seqs, max_batch_tokens)`. Tuned
  for a full batch halfway through `max_model_len`.

P ranges over 0..max_model_len - 1 in both (P = 0 is an empty KV input, which TensorRT accepts). Attention
materializes [B, Q, S, P + S] scores, so the prefill max shape also bounds that tensor: S_max * (max_model_len
- 1 + S_max) * Q elements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ernie_serve.backends.onnx.graph import ATTENTION_BIAS, INPUT_IDS, LOGITS_INDEX, POSITION_IDS, past_names

if TYPE_CHECKING:
    from ernie_serve.core.config import ModelConfig

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # graph input name -> (min, opt, max) shapes
PREFILL, DECODE = 0, 1  # their indices in `profiles()`


def _points(*dims: Shape) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) shapes of an input from each of its dimensions' (min, opt, max)."""
    low, opt, high = (tuple(dim[i] for dim in dims) for i in range(3))
    return low, opt, high


def _profile(config: ModelConfig, batch: Shape, seq: Shape, past: Shape) -> Profile:
    """Input shapes from (min, opt, max) of B, S and P."""
    heads, head_dim = (config.num_key_value_heads,) * 3, (config.head_dim,) * 3
    total = tuple(p + s for p, s in zip(past, seq, strict=True))  # P + S at each point
    profile = {
        INPUT_IDS: _points(batch, seq),  # [B, S]
        POSITION_IDS: _points(batch, seq),  # [B, S]
        ATTENTION_BIAS: _points(batch, seq, total),  # [B, S, P+S]
        LOGITS_INDEX: _points(batch),  # [B]
    }
    for layer in range(config.num_hidden_layers):
        for name in past_names(layer):
            profile[name] = _points(batch, heads, past, head_dim)  # [B, K, P, D]
    return profile


def profiles(config: ModelConfig, max_batch_tokens: int, max_seqs: int, max_model_len: int) -> list[Profile]:
    """[prefill profile, decode profile] (see the module docstring). `max_batch_tokens` is the step's token
    budget (`--max-num-batched-tokens`), `max_seqs` the most sequences in a step (`--max-num-seqs`),
    `max_model_len` the longest sequence, prompt and output together. Raises ValueError for limits below 1."""
    limits = {"max_batch_tokens": max_batch_tokens, "max_seqs": max_seqs, "max_model_len": max_model_len}
    bad = {name: value for name, value in limits.items() if value < 1}
    if bad:
        raise ValueError(f"TensorRT profiles need limits of at least 1, got {bad}")
    longest_past = max_model_len - 1
    chunk = min(max_batch_tokens, max_model_len)  # S_max of a prefill
    chunks = max(1, min(max_seqs, max_batch_tokens // chunk))  # B_max of a prefill: B * S within the budget
    prefill = _profile(config, batch=(1, 1, chunks), seq=(1, chunk, chunk), past=(0, 0, longest_past))
    decoders = min(max_seqs, max_batch_tokens)
    decode = _profile(config, batch=(1, decoders, decoders), seq=(1, 1, 1), past=(0, longest_past // 2, longest_past))
    return [prefill, decode]


def select_profile(all_profiles: list[Profile], batch: int, seq: int, past: int) -> int | None:
    """The index of the profile to run `batch` sequences of `seq` new and `past` cached tokens under: of those
    whose ranges hold the run, the one tuned for the nearest `seq` (a decode step fits both `profiles()`, and
    gets the decode one). None when none holds it: the caller splits the batch."""
    wanted = (batch, seq, past + seq)  # attention_bias [B, S, P+S] has every dimension
    fitting = []
    for index, profile in enumerate(all_profiles):
        low, opt, high = profile[ATTENTION_BIAS]
        if all(lo <= value <= hi for lo, value, hi in zip(low, wanted, high, strict=True)):
            if profile[past_names(0)[0]][0][2] <= past <= profile[past_names(0)[0]][2][2]:
                fitting.append((abs(opt[1] - seq), index))
    return min(fitting)[1] if fitting else None
