"""Token sampling, once for every backend: penalties, min_tokens, temperature, top-k/top-p/min-p, per-request
seeds, and vLLM-shaped logprobs.

Logprobs are those of the model's raw distribution (log-softmax of the logits before penalties and
temperature), as vLLM reports them. All work is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie_serve.core.plan import SampledToken
from ernie_serve.core.request import Logprob, Request

_NEG_INF = float("-inf")


@dataclass
class SamplingState:
    """Per-request sampler state the engine keeps beside the request."""

    generator: torch.Generator  # the request's own stream when seeded, else the engine's shared one


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.shared_generator = torch.Generator().manual_seed(seed)

    def new_state(self, seed: int | None) -> SamplingState:
        """Called when a request is added. A seeded request draws from its own generator, so its tokens do not
        depend on what else shares the batch."""
        if seed is None:
            return SamplingState(self.shared_generator)
        return SamplingState(torch.Generator().manual_seed(seed))

    def __call__(
        self, logits: torch.Tensor, requests: list[Request], states: list[SamplingState]
    ) -> list[SampledToken]:
        """Called once per step with the backend's logits `[B, V]` (row i for requests[i])."""
        # Sampling state (per-request generators, penalties) lives on the host; logits are [B, V], small.
        logits = logits.float().cpu()
        want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(_changes_logits(r) for r in requests):  # else the backend's logits are used as they are
            logits = self._apply_penalties(logits.clone(), requests)
            self._mask_early_stops(logits, requests)

        token_ids = logits.argmax(dim=-1)  # the greedy rows' tokens; sampled rows are replaced below
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if random_rows:
            probs = self._filtered_probs(logits[random_rows], [requests[i] for i in random_rows])
            # Exponential race (argmax p/q with q ~ Exp(1)) samples from p; each row uses its own generator.
            noise = torch.empty_like(probs)
            for row, i in enumerate(random_rows):
                noise[row].exponential_(generator=states[i].generator)
            token_ids[random_rows] = (probs / noise).argmax(dim=-1)

        chosen = token_ids.tolist()
        results = []
        for i, request in enumerate(requests):
            logprobs = None
            if raw_logprobs is not None and want_logprobs[i]:
                logprobs = _logprobs_entry(raw_logprobs[i], chosen[i], request.sampling_params.logprobs or 0)
            results.append(SampledToken(chosen[i], logprobs))
        return results

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        vocab = logits.shape[-1]
        for i, request in enumerate(requests):
            params = request.sampling_params
            if params.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long)
                seen = seen[seen < vocab]
                values = logits[i, seen]
                # CTRL: shrink positive logits and grow negative ones of every token already present
                logits[i, seen] = torch.where(
                    values > 0, values / params.repetition_penalty, values * params.repetition_penalty
                )
            if (params.presence_penalty or params.frequency_penalty) and request.output_token_ids:
                outputs = torch.tensor(request.output_token_ids, dtype=torch.long)
                counts = torch.bincount(outputs[outputs < vocab], minlength=vocab).float()
                logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        return logits

    @staticmethod
    def _mask_early_stops(logits: torch.Tensor, requests: list[Request]) -> None:
        """Until `min_tokens` exist, the tokens that would end the request cannot be sampled."""
        vocab = logits.shape[-1]
        for i, request in enumerate(requests):
            params = request.sampling_params
            if request.num_output_tokens >= params.min_tokens:
                continue
            stops = set(params.stop_token_ids)
            if not params.ignore_eos:
                stops |= request.eos_token_ids
            ids = [t for t in stops if t < vocab]
            if ids:
                logits[i, ids] = _NEG_INF

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, then top-k, top-p and min-p, then softmax. Rows `[R, V]`."""
        params = [r.sampling_params for r in requests]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        logits = logits / temperatures[:, None]
        vocab = logits.shape[-1]
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_ps = [p.top_p if p.top_p is not None else 1.0 for p in params]
        min_ps = [p.min_p for p in params]
        if all(k == vocab for k in top_ks) and all(p >= 1.0 for p in top_ps) and not any(min_ps):
            return torch.softmax(logits, dim=-1)

        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
        ranks = torch.arange(vocab)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= torch.tensor(top_ks)[:, None], _NEG_INF)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # top-p: drop a token when the mass before it already reaches p (the first token always stays)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p = torch.tensor(top_ps)[:, None]
        drop = (mass_before >= top_p) & (top_p < 1.0)
        # min-p: drop tokens less likely than min_p times the most likely one
        drop |= sorted_probs < torch.tensor(min_ps)[:, None] * sorted_probs[:, :1]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
        filtered = torch.full_like(logits, _NEG_INF).scatter(-1, order, sorted_logits)
        return torch.softmax(filtered, dim=-1)


def _changes_logits(request: Request) -> bool:
    """Whether penalties or `min_tokens` may change this request's logits this step. Mirrors the conditions of
    `Sampler._apply_penalties` and `Sampler._mask_early_stops`: one they act on must be covered here too."""
    params = request.sampling_params
    return (
        params.repetition_penalty != 1.0
        or bool(params.presence_penalty or params.frequency_penalty)
        or request.num_output_tokens < params.min_tokens
    )


def _logprobs_entry(row_logprobs: torch.Tensor, token_id: int, top_k: int) -> dict[int, Logprob]:
    """The sampled token's logprob and rank, plus the k most likely tokens (vLLM's layout)."""
    chosen = float(row_logprobs[token_id])
    rank = int((row_logprobs > chosen).sum()) + 1
    entry = {token_id: Logprob(chosen, rank)}
    if top_k > 0:
        values, indices = row_logprobs.topk(min(top_k, row_logprobs.shape[-1]))
        for r, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
            entry.setdefault(index, Logprob(value, r))
    return entry
