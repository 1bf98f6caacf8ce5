"""The engine cache: built engines on disk, keyed by everything an engine depends on.

An engine is only valid for the graph it was built from, the TensorRT version that built it, the GPU model
(name and compute capability), the CUDA version, the optimization profiles' shape ranges and the precision;
`engine_key` hashes exactly those, so a change to any of them builds anew instead of loading an engine that
TensorRT would refuse or, worse, run with the wrong shapes. The graph is identified by the ONNX export's key
(`backends/onnx/export.py`): it hashes the checkpoint (its bytes up to 1 GiB, else names, sizes, mtimes and
headers), the graph builder's source and version, and the export options, which is everything the graph's
content follows from; so a cached engine loads without writing the graph first.

Layout: `<cache dir>/<model_type>-<key>/engine.plan` with `engine.json` beside it (the key's material, sizes,
build time), and one timing cache per TensorRT version and GPU, `<cache dir>/timing-<trt>-sm<cc>.cache`, which
later builds of other models and settings reuse. Writes go to a temporary name and are renamed into place, so
concurrent starts never read half an engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINE_FILE = "engine.plan"
INFO_FILE = "engine.json"
# Bump when the backend changes what it builds or binds (engine inputs, profile layout): part of the key.
ENGINE_FORMAT = "1"

Shape = tuple[int, ...]
Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max), as profiles.py returns


@dataclass(frozen=True)
class Target:
    """The machine an engine is built for: what TensorRT and the GPU report."""

    tensorrt_version: str  # trt.__version__
    gpu_name: str  # torch.cuda.get_device_name()
    compute_capability: tuple[int, int]  # torch.cuda.get_device_capability()
    cuda_version: str  # torch.version.cuda, the CUDA runtime the process uses


def engine_key(
    graph_key: str, target: Target, profiles: Sequence[Profile], precision: str
) -> tuple[str, dict[str, Any]]:
    """(hex key, the material it hashes) for an engine of the graph `graph_key` built for `target` with these
    optimization profiles (index 0 prefill, 1 decode) in `precision` ("bfloat16", "float16", "float32")."""
    material = {
        "format": ENGINE_FORMAT,
        "graph": graph_key,
        "tensorrt": target.tensorrt_version,
        "gpu": target.gpu_name,
        "compute_capability": list(target.compute_capability),
        "cuda": target.cuda_version,
        # lists, not tuples, so that the material reads back from engine.json equal to what was hashed
        "profiles": [
            {name: [list(shape) for shape in shapes] for name, shapes in sorted(profile.items())}
            for profile in profiles
        ],
        "precision": precision,
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], material


def timing_cache_path(cache_dir: Path, target: Target) -> Path:
    """The timing cache shared by every build for this TensorRT version and GPU generation."""
    major, minor = target.compute_capability
    return cache_dir / f"timing-{target.tensorrt_version}-sm{major}{minor}.cache"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class EngineCache:
    """One engine's place in the cache directory."""

    directory: Path  # <cache dir>/<model_type>-<key>

    @classmethod
    def at(cls, cache_dir: Path, model_type: str, key: str) -> EngineCache:
        return cls(cache_dir / f"{model_type}-{key}")

    @property
    def engine_path(self) -> Path:
        return self.directory / ENGINE_FILE

    def read(self) -> bytes | None:
        """The serialized engine, or None when none was built yet."""
        return self.engine_path.read_bytes() if self.engine_path.is_file() else None

    def write(self, engine: bytes, info: Mapping[str, Any]) -> None:
        """Store a built engine and what describes it (the key's material, build time); replaces an engine
        that failed to deserialize."""
        write_atomically(self.directory / INFO_FILE, json.dumps(dict(info), indent=2, default=str).encode())
        write_atomically(self.engine_path, engine)
