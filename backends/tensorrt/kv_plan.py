"""Which requests of a step run together in the engine, and what each run reads from and writes to the pool.

The engine is built from the ONNX graph (`backends/onnx/graph.py`): it takes each sequence's past keys and values
as dense `past_*` inputs `[B, K, P, D]` and returns only the new tokens' keys and values `new_*` `[B, K, S, D]`.
The KV pool stays ernie-serve's paged pool (`[L, 2, slots, K, D]` on the GPU, slot = block * block_size +
offset), so the block manager, preemption and prefix caching work as for the torch backend. Per run, torch gathers
the batch's past slots from the pool into the `past_*` inputs, and scatters the `new_*` rows into the slots of
the new tokens. Everything here is index arithmetic on the host: no TensorRT, no GPU, unit-tested.

Grouping: one run per optimization profile kind. Every request computing one token this step (decodes, and a
one-token prompt or remainder) goes to the decode profile (index 1): one batch, S = 1. Requests computing
several tokens (prompts and prompt chunks) go to the prefill profile (index 0), longest first, batched while the
padded token rows stay within `MAX_PADDING` of the real ones, as the onnx backend does. A run never exceeds its
profile's largest batch.

Cost per step (docs/backends.md): a run of B sequences with the longest past P copies B * P * kv_bytes_per_token
bytes out of the pool (every sequence is padded to the run's longest past) into the engine's input layout, and
new_tokens * kv_bytes_per_token bytes back in; `copy_bytes` computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ernie_serve.backends.onnx.graph import MASKED

PREFILL_PROFILE, DECODE_PROFILE = 0, 1  # optimization profile indices (profiles.py: 0 prefill, 1 decode)
# A padding past position reads this pool slot; the attention bias gives it exactly zero weight. The pool is
# zero-filled when allocated, so the slot always holds finite values (a NaN there would poison the softmax).
PAD_SLOT = 0
MAX_PADDING = 1.25  # a prefill run computes at most this factor more token rows than it needs


@dataclass(frozen=True)
class ProfileLimits:
    """The largest shapes one optimization profile accepts (its max shapes), as the engine reports them."""

    max_batch: int  # B
    max_new: int  # S: tokens per sequence per run
    max_past: int  # P: past positions per sequence


@dataclass(frozen=True)
class Run:
    """One engine execution in a step."""

    profile: int  # PREFILL_PROFILE or DECODE_PROFILE
    members: list[int]  # indices into the step's scheduled requests, in the run's batch order


@dataclass
class RunInputs:
    """Everything one run needs, on the host. Legend: B sequences, S new tokens (right-padded), P past positions
    (right-padded, at least 1), N = the real new tokens of the run."""

    input_ids: torch.Tensor  # [B, S] int64, padding 0
    position_ids: torch.Tensor  # [B, S] int64, padding continues each sequence's positions
    attention_bias: torch.Tensor  # [B, S, P + S] float32: 0 where query s may see key j, MASKED elsewhere
    logits_index: torch.Tensor  # [B] int64: the row of each sequence's last new token
    gather_slots: torch.Tensor  # [B * P] int64: pool slot of each past position, PAD_SLOT past a context
    scatter_slots: torch.Tensor  # [N] int64: pool slot each new token's keys and values go to
    scatter_rows: torch.Tensor  # [N] int64: that token's row in the run's new K/V flattened to [B * S]
    past: int  # P

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def new(self) -> int:
        return int(self.input_ids.shape[1])


def group_runs(
    new_counts: Sequence[int], past_lengths: Sequence[int], prefill: ProfileLimits, decode: ProfileLimits
) -> list[Run]:
    """Split a step's requests (their new-token counts and past lengths, in plan order) into engine runs: one-token
    requests into decode runs, the others into prefill runs (see the module docstring). Raises ValueError for a
    request no profile can take (a context longer than the engine was built for)."""
    for i, (n, past) in enumerate(zip(new_counts, past_lengths, strict=True)):
        limits = decode if n == 1 else prefill
        if n > limits.max_new or past > limits.max_past:
            raise ValueError(
                f"a request computes {n} tokens after {past} cached ones, beyond the engine's profile (at most "
                f"{limits.max_new} new tokens after {limits.max_past}): rebuild it for a longer --max-model-len"
            )
        assert n > 0, f"request {i} computes no tokens"
    runs: list[Run] = []
    singles = [i for i, n in enumerate(new_counts) if n == 1]
    for start in range(0, len(singles), decode.max_batch):
        runs.append(Run(DECODE_PROFILE, singles[start : start + decode.max_batch]))
    real = 0
    first = len(runs)
    for i in sorted((i for i, n in enumerate(new_counts) if n > 1), key=lambda i: -new_counts[i]):
        n = new_counts[i]
        if len(runs) > first:
            run = runs[-1]
            longest = new_counts[run.members[0]]
            fits = len(run.members) < prefill.max_batch
            if fits and (len(run.members) + 1) * longest <= MAX_PADDING * (real + n):
                run.members.append(i)
                real += n
                continue
        runs.append(Run(PREFILL_PROFILE, [i]))
        real = n
    return runs


def slots_of(block_table: Sequence[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Pool slots of positions start..end-1 of a sequence whose blocks are `block_table`: [end - start] int64."""
    positions = torch.arange(start, end)
    table = torch.as_tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


def run_inputs(
    token_ids: Sequence[Sequence[int]],
    past_lengths: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
) -> RunInputs:
    """The graph inputs and gather/scatter slots of one run: per sequence its new tokens, the positions already
    in the pool before them (its context length), and its block table (covering past + new positions)."""
    batch = len(token_ids)
    seq = max(len(t) for t in token_ids)
    # P >= 1: a run of fresh prompts still binds one (masked) past position, so no engine input is ever empty
    past = max(1, *past_lengths)
    input_ids = torch.zeros((batch, seq), dtype=torch.long)
    positions = torch.zeros((batch, seq), dtype=torch.long)
    logits_index = torch.zeros(batch, dtype=torch.long)
    bias = torch.full((batch, seq, past + seq), MASKED, dtype=torch.float32)
    # new tokens are causal among themselves; a padding query row still sees itself, so nothing is NaN
    bias[:, :, past:] = torch.triu(torch.full((seq, seq), MASKED), diagonal=1)
    gather = torch.full((batch, past), PAD_SLOT, dtype=torch.long)
    scatter_slots: list[torch.Tensor] = []
    scatter_rows: list[torch.Tensor] = []
    for b, (tokens, start, table) in enumerate(zip(token_ids, past_lengths, block_tables, strict=True)):
        n = len(tokens)
        if len(table) * block_size < start + n:
            raise ValueError(f"sequence {b}: {len(table)} blocks of {block_size} cannot hold {start + n} positions")
        input_ids[b, :n] = torch.as_tensor(tokens, dtype=torch.long)
        positions[b] = torch.arange(start, start + seq)
        logits_index[b] = n - 1
        bias[b, :, :start] = 0.0
        gather[b, :start] = slots_of(table, 0, start, block_size)
        scatter_slots.append(slots_of(table, start, start + n, block_size))
        scatter_rows.append(torch.arange(b * seq, b * seq + n))
    return RunInputs(
        input_ids=input_ids,
        position_ids=positions,
        attention_bias=bias,
        logits_index=logits_index,
        gather_slots=gather.flatten(),
        scatter_slots=torch.cat(scatter_slots),
        scatter_rows=torch.cat(scatter_rows),
        past=past,
    )


def gather_past(pool: torch.Tensor, inputs: RunInputs) -> torch.Tensor:
    """The run's past keys and values from the pool `[L, 2, slots, K, D]`, as one contiguous `[L, 2, B, K, P, D]`
    tensor whose `[layer, 0]` and `[layer, 1]` are the engine's `past_key_{layer}` / `past_value_{layer}`. One
    indexing op: the slot index `[B, 1, P]` and the head index `[1, K, 1]` broadcast to `[B, K, P]`, so the copy
    lands in the engine's layout without a second transposing copy."""
    heads = torch.arange(pool.shape[3], device=pool.device)
    slots = inputs.gather_slots.to(pool.device).view(inputs.batch, 1, inputs.past)
    return pool[:, :, slots, heads[None, :, None]].contiguous()  # [L, 2, B, K, P, D]


def scatter_new(pool: torch.Tensor, new: torch.Tensor, inputs: RunInputs) -> None:
    """Write the run's new keys and values `[L, 2, B, K, S, D]` (the engine's `new_*` outputs) into the pool
    `[L, 2, slots, K, D]` at the new tokens' slots; padding rows are dropped."""
    layers, two, batch, heads, seq, dim = new.shape
    rows = new.transpose(3, 4).reshape(layers, two, batch * seq, heads, dim)  # [L, 2, B * S, K, D]
    real = rows.index_select(2, inputs.scatter_rows.to(new.device))  # [L, 2, N, K, D]
    pool.index_copy_(2, inputs.scatter_slots.to(pool.device), real.to(pool.dtype))


def copy_bytes(batch: int, past: int, new_tokens: int, kv_bytes_per_token: int) -> tuple[int, int]:
    """(bytes gathered out of the pool, bytes scattered into it) by one run: B * P padded past positions and the
    run's real new tokens, at `kv_bytes_per_token` (2 * layers * KV heads * head dim * dtype bytes) each."""
    return batch * past * kv_bytes_per_token, new_tokens * kv_bytes_per_token
