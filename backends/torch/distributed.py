"""The ranks of a tensor-parallel torch backend, over `torch.distributed` (gloo on CPU, NCCL on CUDA).

Rank 0 lives in the engine process: it runs the one scheduler and sampler, and its backend sends every other
rank each step's plan. Ranks 1..N-1 are workers that run the same backend on their shard and return nothing
but their share of the collectives. On one host rank 0 starts the workers itself (`python -m` this module, one
process each); across hosts every rank is started by `torchrun`, which sets `RANK`, `WORLD_SIZE`,
`MASTER_ADDR` and `MASTER_PORT`, and ranks above 0 of `ernie-serve serve` then run `serve_worker` instead of a
server (docs/parallelism.md has the commands).

Two channels join the ranks:
- the process group (`init_process_group`, with a timeout) carries the model's collectives: all-reduces of
  partial outputs and the gather of the logits;
- a `TCPStore` hosted with rank 0 carries the control messages (plans, releases, allocation, close) as
  numbered keys: a worker idle for hours waits on a key, not in a collective that would time out. Workers also
  bump a heartbeat counter there every second, so that rank 0 can say which rank stopped answering.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import structlog
import torch
import torch.distributed as dist

from ernie_serve.core.errors import UserError

log = structlog.get_logger("ernie_serve.torch.parallel")

WORKER_MODULE = "ernie_serve.backends.torch.distributed"
STORE_WAIT = datetime.timedelta(seconds=30)  # one wait of an idle worker for its next message; it waits again
HEARTBEAT_SECONDS = 1.0
START_TIMEOUT = 600.0  # seconds for every rank to join the group (loading is not counted)


class ParallelStartError(UserError, RuntimeError):
    """A rank failed before serving (it exited, its load failed, or the world size does not match)."""


@dataclass(frozen=True)
class RankEnv:
    """Where one rank stands in the world: from torchrun's environment, or from rank 0 that spawned it."""

    rank: int
    world_size: int
    local_rank: int  # index of its device on its host
    master_addr: str
    master_port: int
    torchrun: bool  # started by torchrun (ranks on several hosts), not by ernie-serve


def torchrun_env() -> RankEnv | None:
    """This process's rank under torchrun (or any launcher that sets the same variables), else None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return RankEnv(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        torchrun=True,
    )


def exit_reason(code: int) -> str:
    """`exited with code 1` or `killed by SIGKILL`, from a process's return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Collectives:
    """The model's collectives over the default process group, timed: `seconds` is the time spent in them,
    which the benchmark reports as the communication share of a step."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.seconds = 0.0
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] partial -> [T, H] summed over ranks
        started = time.perf_counter()
        dist.all_reduce(x)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:  # [S, V/N] -> [S, V/N * N] on rank 0
        """Each rank's columns side by side on rank 0 (the logits of its vocab rows); other ranks get theirs."""
        started = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return torch.cat(parts, dim=1) if parts is not None else x


class ParallelRuntime:
    """One rank's connection to the others. Rank 0 sends messages and (single host) owns the worker
    processes; the others receive. Built by `start` on rank 0 and `join` on the workers."""

    def __init__(self, env: RankEnv, store: dist.TCPStore, device: torch.device, timeout: float) -> None:
        self.env = env
        self.rank, self.world_size = env.rank, env.world_size
        self.store = store
        self.device = device
        self.collectives = Collectives(self.rank, self.world_size)
        self.workers: dict[int, subprocess.Popen[bytes]] = {}  # rank -> process, when rank 0 spawned them
        self._sent = 0  # messages sent (rank 0) or received (workers)
        self._closing = False
        self._failed: str | None = None
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("pg", store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )

    # ----- start-up -----
    @classmethod
    def start(cls, world_size: int, payload: dict[str, Any], device: torch.device, timeout: float) -> ParallelRuntime:
        """Rank 0 on one host: host the store on 127.0.0.1, spawn ranks 1..N-1 (each gets `payload`: the
        settings and model to load), and form the group with them."""
        if dist.is_initialized():
            raise ParallelStartError("a tensor-parallel engine is already running in this process: close it first")
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=STORE_WAIT, wait_for_workers=False)
        env = RankEnv(0, world_size, 0, "127.0.0.1", store.port, torchrun=False)
        workers: dict[int, subprocess.Popen[bytes]] = {}
        child_env = {**os.environ, "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
        for rank in range(1, world_size):
            command = [
                sys.executable,
                "-m",
                WORKER_MODULE,
                str(rank),
                str(world_size),
                env.master_addr,
                str(env.master_port),
            ]
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, env=child_env)
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(payload))
            proc.stdin.close()
            workers[rank] = proc
        try:
            cls._wait_keys(store, [f"joined/{r}" for r in workers], workers, "joining the group", START_TIMEOUT)
            runtime = cls(env, store, device, timeout)
        except BaseException:
            for proc in workers.values():
                proc.kill()
            raise
        runtime.workers = workers
        for rank, proc in workers.items():
            threading.Thread(target=runtime._watch, args=(rank, proc), name=f"tp-watch-{rank}", daemon=True).start()
        return runtime

    @classmethod
    def join(cls, env: RankEnv, device: torch.device, timeout: float) -> ParallelRuntime:
        """A worker (spawned, or any torchrun rank, 0 included): connect to the store and the group. Under
        torchrun, rank 0 hosts the store unless torchrun's own agent already does at that port."""
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        host = env.rank == 0 and not agent_store
        store = dist.TCPStore(
            env.master_addr, env.master_port, env.world_size, host, timeout=STORE_WAIT, wait_for_workers=False
        )
        store = dist.PrefixStore("ernie-serve", store) if env.torchrun else store
        if env.rank:
            store.set(f"joined/{env.rank}", "1")
        elif env.torchrun:  # nobody spawned the others: wait for them to join like spawned ones
            cls._wait_keys(store, [f"joined/{r}" for r in range(1, env.world_size)], {}, "joining", START_TIMEOUT)
        runtime = cls(env, store, device, timeout)
        if env.rank:
            threading.Thread(target=runtime._heartbeat, name="tp-heartbeat", daemon=True).start()
        return runtime

    @staticmethod
    def _wait_keys(
        store: Any, keys: list[str], workers: dict[int, subprocess.Popen[bytes]], doing: str, timeout: float
    ) -> None:
        """Wait until every key is set, failing at once (naming the rank) when a worker process ends."""
        deadline = time.monotonic() + timeout
        pending = list(keys)
        while pending:
            for rank, proc in workers.items():
                code = proc.poll()
                if code is not None:
                    failed = store.get(f"failed/{rank}").decode() if store.check([f"failed/{rank}"]) else ""
                    reason = f": {failed}" if failed else " (its log above says why)"
                    raise ParallelStartError(f"tensor-parallel rank {rank} {exit_reason(code)} while {doing}{reason}")
            for key in pending:
                rank = key.rsplit("/", 1)[1]  # every key this waits on ends in the rank that sets it
                if store.check([f"failed/{rank}"]):
                    message = store.get(f"failed/{rank}").decode()
                    raise ParallelStartError(f"tensor-parallel rank {rank} failed while {doing}: {message}")
            pending = [k for k in pending if not store.check([k])]
            if pending and time.monotonic() > deadline:
                raise ParallelStartError(
                    f"tensor-parallel ranks did not finish {doing} within {timeout:g} s: {pending}"
                )
            if pending:
                time.sleep(0.05)  # polling a local store and the processes: no event to wait on for both

    def wait_loaded(self) -> dict[int, dict[str, int]]:
        """Rank 0, after loading its own shard: wait for every worker's, failing with the rank's own error.
        Returns each worker's resident weight bytes by kind."""
        ranks = range(1, self.world_size)
        self._wait_keys(self.store, [f"loaded/{r}" for r in ranks], self.workers, "loading", float("inf"))
        return {r: pickle.loads(self.store.get(f"loaded/{r}")) for r in ranks}

    def report_loaded(self, weight_bytes: dict[str, int]) -> None:
        """A worker, once its shard is loaded."""
        self.store.set(f"loaded/{self.rank}", pickle.dumps(weight_bytes))

    def abort(self) -> None:
        """Rank 0, when its own start-up failed after spawning: end the workers now."""
        self._closing = True
        for proc in self.workers.values():
            proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def report_failure(self, message: str) -> None:
        """A worker whose start-up failed: rank 0 shows `message` as the reason."""
        try:
            self.store.set(f"failed/{self.rank}", message)
        except Exception:  # the store may be gone with rank 0
            pass

    # ----- messages, rank 0 -> workers -----
    def send(self, message: tuple[Any, ...], wait_for_ack: bool = False) -> None:
        """Rank 0: hand `message` to every worker. The previous message's key is deleted here: every worker has
        read it, since each message ends in a collective or is acknowledged."""
        key = f"message/{self._sent}"
        self.store.set(key, pickle.dumps(message))
        if self._sent:
            self.store.delete_key(f"message/{self._sent - 1}")
        self._sent += 1
        if wait_for_ack:
            acks = [f"ack/{self._sent - 1}/{r}" for r in range(1, self.world_size)]
            self._wait_keys(self.store, acks, self.workers, "answering", float("inf"))

    def receive(self) -> tuple[Any, ...]:
        """A worker: the next message, however long rank 0 is idle; raises when rank 0 is gone."""
        key = f"message/{self._sent}"
        while True:
            try:
                self.store.wait([key], STORE_WAIT)
                break
            except dist.DistStoreError as exc:  # a wait that timed out: rank 0 is idle, wait again
                if "timeout" not in str(exc).lower():
                    raise
        self._sent += 1
        return pickle.loads(self.store.get(key))

    def ack(self) -> None:
        self.store.set(f"ack/{self._sent - 1}/{self.rank}", "1")

    @property
    def failed(self) -> str | None:
        """Rank 0: why a spawned worker ended unasked (one line naming it), or None while all run."""
        return self._failed

    # ----- faults -----
    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        """Rank 0, one thread per spawned worker: log at once, naming the rank, when it ends unasked."""
        code = proc.wait()
        if not self._closing:
            self._failed = f"tensor-parallel rank {rank} (pid {proc.pid}) {exit_reason(code)}"
            log.error("a tensor-parallel worker ended", rank=rank, pid=proc.pid, reason=exit_reason(code))

    def _heartbeat(self) -> None:
        """A worker: bump its counter every second, on a connection of its own, until the process ends."""
        try:
            env = self.env
            store = dist.TCPStore(env.master_addr, env.master_port, self.world_size, False, timeout=STORE_WAIT)
            beats: Any = dist.PrefixStore("ernie-serve", store) if env.torchrun else store
            while True:
                beats.add(f"heartbeat/{self.rank}", 1)
                time.sleep(HEARTBEAT_SECONDS)
        except Exception:  # rank 0 and its store are gone: the main thread finds out by itself
            return

    def diagnose(self) -> str:
        """Rank 0, after a collective or a message failed: which rank is at fault and why, as one line."""
        if self._failed is not None:
            return self._failed
        ended = [(r, p) for r, p in self.workers.items() if p.poll() is not None]
        if ended:
            return "; ".join(f"tensor-parallel rank {r} (pid {p.pid}) {exit_reason(p.returncode)}" for r, p in ended)
        try:
            before = {r: self.store.add(f"heartbeat/{r}", 0) for r in range(1, self.world_size)}
            time.sleep(2 * HEARTBEAT_SECONDS)  # long enough for every live worker to beat again
            silent = [r for r, n in before.items() if self.store.add(f"heartbeat/{r}", 0) == n]
        except Exception as exc:
            return f"the tensor-parallel control store failed: {exc}"
        if self._failed is not None:  # a worker's watcher saw it end while we waited (`poll` above cannot: the
            return self._failed  # watcher's `wait` holds the process's lock, and `poll` then says "running")
        if silent:
            return f"tensor-parallel rank {', '.join(map(str, silent))} stopped answering (no heartbeat for 2 s)"
        return "every tensor-parallel rank is alive; a collective failed or timed out"

    def close(self) -> None:
        """Rank 0: tell the workers to exit and wait for them (killing any that do not within 10 s); every
        rank: leave the process group."""
        self._closing = True
        if self.rank == 0:
            try:
                self.send(("close",))
            except Exception:  # a broken store: the workers exit when they find it gone
                pass
            for proc in self.workers.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_worker(env: RankEnv, payload: dict[str, Any]) -> int:
    """A worker rank's whole life: load its shard, then run each message rank 0 sends until `close`. Returns
    the process's exit code; a failure is logged with the rank and its traceback."""
    from ernie_serve.backends.torch.backend import TorchBackend  # the backend imports this module
    from ernie_serve.logging import configure_logging

    settings = payload["settings"]
    configure_logging(settings.log_format, payload.get("log_level", "info"))
    torch.set_num_threads(payload.get("threads") or torch.get_num_threads())
    bound = log.bind(rank=env.rank)
    backend = TorchBackend(rank_env=env)
    try:
        backend.load(payload["model_config"], settings, payload["model_path"], payload["options"])
    except BaseException as exc:
        bound.error("tensor-parallel worker failed to load", error=f"{type(exc).__name__}: {exc}")
        if backend.runtime is not None:
            backend.runtime.report_failure(f"{type(exc).__name__}: {exc}")
        return 1
    runtime = backend.runtime
    assert runtime is not None
    try:
        while True:
            message = runtime.receive()
            kind = message[0]
            if kind == "execute":
                _, plan, released = message
                backend.release(released)
                backend.execute(plan)
            elif kind == "allocate":
                backend.allocate_kv_cache(*message[1:])
                runtime.ack()
            elif kind == "close":
                backend.close()
                return 0
            else:
                raise RuntimeError(f"unknown message {kind!r}")
    except BaseException as exc:
        bound.error(
            "tensor-parallel worker stopped", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
        return 1


def serve_torchrun_worker(settings: Any) -> int:
    """`ernie-serve serve|generate` on a torchrun rank above 0: resolve the same model as rank 0 (every rank
    parses the same command line) and serve as a worker until rank 0 closes. Returns the exit code."""
    from ernie_serve.backends.torch.backend import TorchBackend
    from ernie_serve.models import resolve_model

    env = torchrun_env()
    assert env is not None and env.rank > 0, "only for torchrun ranks above 0"
    if settings.backend != "torch" or settings.tensor_parallel_size < 2:
        raise ParallelStartError(
            f"torchrun started rank {env.rank} of {env.world_size}, but only the torch backend with "
            f"--tensor-parallel-size {env.world_size} runs on several ranks"
        )
    resolved = resolve_model(settings)
    payload = {
        "model_config": resolved.config,
        "settings": settings,
        "model_path": resolved.weights_path,
        "options": TorchBackend.options_class(**settings.backend_options),
    }
    return serve_worker(env, payload)


def _main(argv: list[str]) -> int:
    """`python -m ernie_serve.backends.torch.distributed RANK WORLD_SIZE ADDR PORT`, the payload on stdin: how
    rank 0 starts its workers on one host."""
    rank, world_size, addr, port = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    payload = pickle.loads(sys.stdin.buffer.read())
    return serve_worker(RankEnv(rank, world_size, rank, addr, port, torchrun=False), payload)


if __name__ == "__main__":
    # run the imported module's copy, so that the backend and this loop share one set of classes and state
    from ernie_serve.backends.torch import distributed

    sys.exit(distributed._main(sys.argv[1:]))
