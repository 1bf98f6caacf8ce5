"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, a free list, and hash-chained prefix caching.

Pure Python. The scheduler asks `can_allocate` before `allocate`; the backend only ever sees block ids.
Freed blocks that hold a full, hashed prefix stay findable until reused, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ernie_serve.core.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are computed
    token_ids: tuple[
        int, ...
    ] = ()  # the block's tokens when hashed; checked on a hit so a collision is harmless


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found cached


@dataclass
class _RequestBlocks:
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the request's full computed blocks


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """The hash of a full block depends on every token before it, so equal hashes mean equal prefixes."""
    return hash((parent, token_ids))


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = reuse first). Cached ones keep their hash until reused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._per_request: dict[str, _RequestBlocks] = {}
        self.stats = PrefixCacheStats()

    # ----- queries -----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- prefix cache lookup -----
    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of the request's tokens. At least one token is always left
        to compute, because the step that computes it must produce the logits for sampling."""
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hit: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            parent = chain_hash(parent, chunk)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hit.append(block_id)
        return hit

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not every retry while it waits for room)."""
        if self.enable_prefix_caching:
            self.stats.queries += request.num_prompt_tokens
            self.stats.hits += min(num_hit_tokens, request.num_prompt_tokens)

    # ----- allocation -----
    def can_allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Whether `allocate(request, num_new_tokens, cached_block_ids)` would succeed."""
        held = len(request.block_ids) + len(cached_block_ids)
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - held
        # cached blocks that sit on the free list are taken from it, not added to it
        reclaimed = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return needed <= len(self._free) - reclaimed

    def allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> None:
        """Give the request blocks for its first `num_computed_tokens + num_new_tokens` tokens, first taking
        references on `cached_block_ids` (a prefix hit from `find_cached_prefix`, on first schedule only)."""
        assert self.can_allocate(request, num_new_tokens, cached_block_ids), "allocate without can_allocate"
        state = self._per_request.setdefault(request.request_id, _RequestBlocks())
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
            assert block.block_hash is not None
            state.block_hashes.append(block.block_hash)
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"block {block_id} on the free list is referenced"
            if block.block_hash is not None:  # evict the stale cached prefix it held
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash, block.token_ids = None, ()
            block.ref_count = 1
            request.block_ids.append(block_id)

    def cache_computed_blocks(self, request: Request) -> None:
        """Called after a step advanced `num_computed_tokens`: hash blocks that became full so later requests
        with the same prefix can share them."""
        if not self.enable_prefix_caching:
            return
        state = self._per_request.setdefault(request.request_id, _RequestBlocks())
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= len(state.block_hashes):
            return
        parent = state.block_hashes[-1] if state.block_hashes else None
        for i in range(len(state.block_hashes), num_full):
            chunk = tuple(request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size))
            parent = chain_hash(parent, chunk)
            state.block_hashes.append(parent)
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None:
                block.block_hash, block.token_ids = parent, chunk
                # an identical block computed concurrently by another request stays the canonical one
                self._cached.setdefault(parent, block.block_id)

    def free(self, request: Request) -> None:
        """Drop the request's references (finished, aborted or preempted). Its tail blocks go to the front of
        the eviction order, so shared prefixes, freed last, are kept longest."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)  # nothing cached: reuse first
                else:
                    self._free[block_id] = None
        request.block_ids = []
        self._per_request.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.block_hash, block.token_ids = None, ()
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].block_hash == h}

    def check_invariants(self, live_requests: list[Request]) -> None:
        """Every block is either free or referenced exactly as often as live requests hold it."""
        counts = [0] * self.num_blocks
        for request in live_requests:
            for block_id in request.block_ids:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id} ref count is wrong"
            assert (block.block_id in self._free) == (block.ref_count == 0), (
                f"block {block.block_id} misfiled"
            )
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, "stale prefix cache entry"
