"""Token sampling, once for every backend: penalties, min_tokens, temperature, top-k/top-p/min-p, per-request
seeds, per-sequence constraints (`LogitsProcessor`) and vLLM-shaped logprobs, on the logits' device for the whole
batch: only the chosen ids, the asked-for logprobs and the constraints' masks cross. Logprobs are those of the raw
distribution (log-softmax of the logits before penalties, constraints and temperature), as vLLM reports them. All work
is float32. Shapes: B rows, V vocabulary, P rows with penalties, C constrained rows, W = ceil(V / 32) bitmask words,
R rows sampled at random, L rows asking for logprobs, K the most top logprobs one of them asks for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ernie_serve.core.plan import SampledToken
from ernie_serve.core.request import Logprob, Request
from ernie_serve.core.sampling_params import SamplingParams

_NEG_INF = float("-inf")


class LogitsProcessor(ABC):
    """One sequence's constraint on its next token: a grammar matcher, or anything simpler (force `</think>`).

    Made per sequence by the frontend when it adds the request (each of `n` its own), from the compiled
    `structured_outputs` and `SamplingParams.logits_processors`' factories. On the engine thread, in each step in
    which its sequence samples, the sampler calls `fill_bitmask`, samples, then calls `accept_token`; the
    scheduler then ends the sequence ("stop") if `is_finished`. It sees each output token once, in order, so its
    state follows the request's tokens (preemption keeps them: nothing to undo).
    """

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor) -> bool:
        """`bitmask`: an int32 CPU row `[W]`, all bits set; token t is bit t % 32 of word t // 32. Clear the bits
        of the tokens not allowed next (`ernie_serve.structured_output.allow_only` keeps a few) and return True,
        or return False to leave this step unconstrained. Eos can end the sequence only where its bit is set."""

    @abstractmethod
    def accept_token(self, token_id: int) -> None:
        """The sequence's new token (one the mask allowed)."""

    @property
    def is_finished(self) -> bool:
        """Read after `accept_token`: True ends the sequence, e.g. once its grammar takes no more tokens."""
        return False


@dataclass
class SamplingState:
    """Per-request sampler state the engine keeps beside the request."""

    seed: int | None  # None: the request draws from the sampler's shared generator
    generator: torch.Generator | None = None  # made at first use, on the logits' device: it is bound to one


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._shared_generators: dict[torch.device, torch.Generator] = {}
        # The penalized rows of the last call that had any, kept so that a step counts only the tokens appended
        # since. Counts follow each request's own ids (which only grow), not what was sampled; a request that call
        # did not have (new, or preempted then) is counted afresh.
        self._counted: list[tuple[SamplingState, int]] = []  # row j: (its state, output tokens counted)
        self._counts = torch.zeros(0, 2, 0)  # [P, 2, V] occurrences of each token in the prompt (0), output (1)

    def new_state(self, seed: int | None) -> SamplingState:
        """Called when a request is added. A seeded request draws from its own generator, so its tokens do not
        depend on what else shares the batch."""
        return SamplingState(seed)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request], states: list[SamplingState]
    ) -> list[SampledToken]:
        """Called once per step with the backend's logits `[B, V]` (row i for requests[i])."""
        raw = logits.float()  # [B, V]; the backend's own tensor when float32 already, so never written to
        vocab, device = raw.shape[-1], raw.device
        penalized = [i for i, r in enumerate(requests) if _has_penalties(r.sampling_params)]
        stops = [(i, t) for i, r in enumerate(requests) for t in _early_stops(r) if 0 <= t < vocab]
        constrained, bitmask = _bitmasks(requests, vocab)  # [C], [C, W] on the host
        logits = raw.clone() if penalized or stops else raw  # [B, V]
        if penalized:
            self._apply_penalties(logits, requests, states, penalized)
        elif self._counted:  # no penalties this step: let go of the counts table and the states it holds
            self._counted, self._counts = [], self._counts.new_zeros(0, 2, 0)
        if stops:  # until `min_tokens` exist, the tokens that would end a request cannot be sampled
            index = _index(stops, device)  # [N, 2] (row, token)
            logits[index[:, 0], index[:, 1]] = _NEG_INF
        if constrained:  # unpacked on the host (little-endian words: token t is bit t % 8 of byte t // 8)
            allowed = np.ones((len(requests), bitmask.shape[1] * 32), dtype=np.uint8)  # [B, 32 W]
            allowed[constrained] = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
            allowed = torch.from_numpy(allowed).view(torch.bool)[:, :vocab].to(device)  # [B, V]
            logits = torch.where(allowed, logits, _NEG_INF)  # a new tensor: rows without constraints keep their values

        token_ids = _argmax(logits)  # [B] the greedy rows' tokens; sampled rows are replaced below
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if random_rows:
            # Unseeded rows first: one draw from the shared generator serves them all, in row order.
            random_rows.sort(key=lambda i: states[i].seed is not None)
            num_shared = sum(states[i].seed is None for i in random_rows)
            rows = _index(random_rows, device)  # [R]
            probs = _filtered_probs(logits[rows], [requests[i].sampling_params for i in random_rows])  # [R, V]
            # Exponential race (argmax p/q with q ~ Exp(1)) samples from p; seeded rows use their own generators.
            noise = torch.empty_like(probs)  # [R, V]
            if device not in self._shared_generators:
                self._shared_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
            noise[:num_shared].exponential_(generator=self._shared_generators[device])
            for row, i in enumerate(random_rows[num_shared:], start=num_shared):
                state = states[i]
                state.generator = state.generator or torch.Generator(device=device).manual_seed(state.seed)
                noise[row].exponential_(generator=state.generator)
            token_ids[rows] = _argmax(probs / noise)

        chosen = token_ids.tolist()
        for request, token in zip(requests, chosen, strict=True):
            for processor in request.logits_processors:
                processor.accept_token(token)
        logprobs = _logprobs(raw, token_ids, chosen, [r.sampling_params.logprobs for r in requests])
        return [SampledToken(t, lp) for t, lp in zip(chosen, logprobs, strict=True)]

    def _apply_penalties(
        self, logits: torch.Tensor, requests: list[Request], states: list[SamplingState], rows: list[int]
    ) -> None:
        """Repetition (CTRL, over prompt and output), then frequency and presence (OpenAI, over the output)."""
        params = [requests[i].sampling_params for i in rows]
        factors = [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params]
        repetition, frequency, presence = torch.tensor(factors, device=logits.device)[:, :, None].unbind(1)  # [P, 1]
        counts = self._token_counts([requests[i] for i in rows], [states[i] for i in rows], logits)  # [P, 2, V]
        in_prompt, in_output = (counts > 0).unbind(1)  # [P, V] each
        index = _index(rows, logits.device)  # [P]
        values = logits[index]  # [P, V]
        # CTRL: shrink positive logits and grow negative ones of every token already present
        repeated = torch.where(values > 0, values / repetition, values * repetition)
        values = torch.where(in_prompt | in_output, repeated, values)
        logits[index] = values - (frequency * counts[:, 1] + presence * in_output.float())

    def _token_counts(self, requests: list[Request], states: list[SamplingState], logits: torch.Tensor) -> torch.Tensor:
        """The requests' token counts, brought up to date with their ids: a row the last call had is carried over
        and gets the output tokens appended since; any other is counted afresh."""
        vocab, device = logits.shape[-1], logits.device
        last = {id(s): (j, n) for j, (s, n) in enumerate(self._counted)}  # ids stay unique: _counted holds them
        carried, add = [], []  # (row, its row last call); (row, 0 for prompt or 1 for output, token)
        for row, (request, state) in enumerate(zip(requests, states, strict=True)):
            j, counted = last.get(id(state), (-1, 0))
            if j >= 0:
                carried.append((row, j))
            else:
                add += [(row, 0, t) for t in request.prompt_token_ids if 0 <= t < vocab]
            add += [(row, 1, t) for t in request.output_token_ids[counted:] if 0 <= t < vocab]
        # A new table unless this is the last call's batch again, in the same order (steady decoding).
        if len(carried) != len(requests) or carried != [(j, j) for j in range(len(self._counted))]:
            counts = torch.zeros(len(requests), 2, vocab, device=device)  # [P, 2, V]
            if carried:
                index = _index(carried, device)  # [C, 2] (row, its row last call)
                counts[index[:, 0]] = self._counts[index[:, 1]]
            self._counts = counts
        if add:
            index = _index(add, device)  # [N, 3]
            self._counts.index_put_(tuple(index.T), torch.ones(len(add), device=device), accumulate=True)
        self._counted = [(s, r.num_output_tokens) for r, s in zip(requests, states, strict=True)]
        return self._counts


def _argmax(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(dim=-1)` `[B, V] -> [B]` (int64, the first of equal maxima), by numpy on the CPU: torch's
    CPU argmax along a row took 80 us for one row of 32,000 float32 logits here, numpy's 4 us (a single-request
    decode step of the CPU benchmark model takes 8 ms)."""
    if values.device.type != "cpu" or values.dtype != torch.float32:
        return values.argmax(dim=-1)
    return torch.from_numpy(values.numpy().argmax(axis=-1).astype(np.int64, copy=False))


def _index(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _bitmasks(requests: list[Request], vocab: int) -> tuple[list[int], torch.Tensor | None]:
    """The rows some processor constrains, and their bitmasks `[C, W]` on the host (a request's rows and-ed)."""
    rows, masks = [], []
    for i, request in enumerate(requests):
        mask = None
        for processor in request.logits_processors:
            row = torch.full((-(-vocab // 32),), -1, dtype=torch.int32)  # [W]
            if processor.fill_bitmask(row):
                mask = row if mask is None else mask.bitwise_and_(row)
        if mask is not None:
            rows.append(i)
            masks.append(mask)
    return rows, torch.stack(masks) if masks else None


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def _early_stops(request: Request) -> set[int]:
    """The tokens that would end the request, while `min_tokens` says it may not end yet. The caller skips ids
    outside the vocabulary: they end nothing, and a negative one would index from the end."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return set()
    return set(params.stop_token_ids) | (set() if params.ignore_eos else request.eos_token_ids)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, then softmax. Rows `[R, V]`."""
    vocab = logits.shape[-1]
    table = [(p.temperature, p.top_k if 0 < p.top_k < vocab else vocab, p.top_p or 1.0, p.min_p) for p in params]
    temperature, top_k, top_p, min_p = torch.tensor(table, device=logits.device)[:, :, None].unbind(1)  # [R, 1]
    logits = logits / temperature
    if all(k == vocab and p >= 1.0 and not m for _, k, p, m in table):
        return torch.softmax(logits, dim=-1)

    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    sorted_logits = sorted_logits.masked_fill(torch.arange(vocab, device=logits.device) >= top_k, _NEG_INF)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # top-p: drop a token when the mass before it already reaches p (the first token always stays)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= top_p) & (top_p < 1.0)
    # min-p: drop tokens less likely than min_p times the most likely one
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    filtered = torch.full_like(logits, _NEG_INF).scatter(-1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


def _logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, chosen: list[int], asked: list[int | None]
) -> list[dict[int, Logprob] | None]:
    """Per row None, or vLLM's layout: the sampled token's logprob and rank, plus the k most likely tokens."""
    rows = [i for i, k in enumerate(asked) if k is not None]
    entries: list[dict[int, Logprob] | None] = [None] * len(asked)
    if not rows:
        return entries
    index = _index(rows, raw.device)  # [L]
    logprobs = torch.log_softmax(raw[index], dim=-1)  # [L, V]
    sampled = logprobs.gather(1, token_ids[index, None])  # [L, 1]
    ranks = ((logprobs > sampled).sum(dim=-1) + 1).tolist()  # [L]
    top = logprobs.topk(min(max(asked[i] or 0 for i in rows), raw.shape[-1]), dim=-1)  # [L, K]
    values, indices, sampled_values = top.values.tolist(), top.indices.tolist(), sampled[:, 0].tolist()
    for j, i in enumerate(rows):
        entry = entries[i] = {chosen[i]: Logprob(sampled_values[j], ranks[j])}
        for r, (value, token) in enumerate(zip(values[j][: asked[i]], indices[j][: asked[i]], strict=True), 1):
            entry.setdefault(token, Logprob(value, r))
    return entries
