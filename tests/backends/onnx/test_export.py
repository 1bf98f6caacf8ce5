"""The export cache (reuse, invalidation), the `ernie-serve export onnx` command, and the streamed weights."""

from __future__ import annotations

import io
import json
import shutil
import weakref

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ernie_serve import LLM, SamplingParams  # noqa: E402
from ernie_serve.backends.onnx import export as export_mod  # noqa: E402
from ernie_serve.backends.onnx.export import ExportOptions, cached_export, export_command, export_key  # noqa: E402
from ernie_serve.backends.onnx.graph import save_graph  # noqa: E402
from ernie_serve.checkpoint import CheckpointError  # noqa: E402
from ernie_serve.models import read_model_config  # noqa: E402
from ernie_serve.quantization import QuantSpec  # noqa: E402
from ernie_serve.testing.checkpoints import TINY_SHAPES  # noqa: E402


@pytest.fixture()
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A private copy of a tiny checkpoint that a test may modify."""
    source = tiny_checkpoint("moe_top1_dense_tail", torch.bfloat16)
    return shutil.copytree(source, tmp_path / "checkpoint")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def test_second_start_reuses_the_export_and_a_changed_checkpoint_reexports(checkpoint_copy, cache_dir) -> None:
    config = read_model_config(checkpoint_copy)
    first = cached_export(config, str(checkpoint_copy))
    assert not first.cached and first.path.is_file() and first.path.parent.parent == cache_dir
    info = json.loads((first.path.parent / "export.json").read_text())
    assert info["key"] == first.key and info["nodes"] > 0

    again = cached_export(config, str(checkpoint_copy))
    assert again.cached and again.path == first.path

    # Same size, same name, different bytes: the key follows the contents.
    index = json.loads((checkpoint_copy / "model.safetensors.index.json").read_text())
    shard = checkpoint_copy / sorted(set(index["weight_map"].values()))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    changed = cached_export(config, str(checkpoint_copy))
    assert not changed.cached and changed.key != first.key
    assert len(list(cache_dir.iterdir())) == 2


def test_a_paddle_checkpoint_exports_and_serves_like_its_pt_original(
    paddle_checkpoint, tiny_checkpoint, cache_dir
) -> None:
    """The export reads weights through the shared checkpoint reader: a -Paddle directory needs nothing of its own."""
    shape = "moe_top1_dense_tail"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in ([5, 6, 7], list(range(10, 31)))]
    with LLM(model=str(tiny_checkpoint(shape, torch.bfloat16)), backend="torch") as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(requests, params)]
    with LLM(model=str(paddle_checkpoint(shape)), backend="onnx") as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(requests, params)] == expected
    assert len(list(cache_dir.glob("*/model.onnx"))) == 1  # it did export


def test_key_covers_options_config_and_dummy_seed(checkpoint_copy, cache_dir) -> None:
    config = read_model_config(checkpoint_copy)
    base, material = export_key(config, str(checkpoint_copy), 0, ExportOptions())
    assert {"source", "options", "graph_version", "graph_builder", "onnx"} <= set(material)
    assert export_key(config, str(checkpoint_copy), 0, ExportOptions(opset=18))[0] != base
    (checkpoint_copy / "config.json").write_text((checkpoint_copy / "config.json").read_text() + "\n")
    assert export_key(config, str(checkpoint_copy), 0, ExportOptions())[0] != base
    dummy = export_key(config, None, 0, ExportOptions())[0]
    assert dummy != base and export_key(config, None, 1, ExportOptions())[0] != dummy


def test_large_checkpoints_are_keyed_by_stat_and_header(checkpoint_copy, monkeypatch) -> None:
    monkeypatch.setattr(export_mod, "CONTENT_HASH_LIMIT", 0)
    fingerprint = export_mod.checkpoint_fingerprint(checkpoint_copy)
    entry = fingerprint["weights"][0]
    assert "blake2b" not in entry and {"size", "mtime_ns", "header"} <= set(entry)


def test_export_command_writes_a_checked_model_and_prints_a_summary(tiny_checkpoint, tmp_path) -> None:
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    out, err = io.StringIO(), io.StringIO()
    code = export_command(str(checkpoint), str(tmp_path / "exported"), out=out, err=err)
    assert code == 0, err.getvalue()
    onnx.checker.check_model(str(tmp_path / "exported" / "model.onnx"))
    assert (tmp_path / "exported" / "model.onnx.data").is_file()
    summary = out.getvalue()
    assert "Ernie4_5_MoeForCausalLM" in summary and "6 experts top-2 + 2 shared" in summary
    assert "onnx.checker: passed" in summary and "external weights" in summary
    assert err.getvalue() == ""


def test_export_command_reports_a_bad_model_in_one_line(tmp_path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert export_command(str(tmp_path / "missing"), str(tmp_path / "x"), out=out, err=err) == 1
    assert err.getvalue().startswith("ernie-serve: error: ") and err.getvalue().count("\n") == 1
    assert out.getvalue() == ""


def test_export_arguments_parse() -> None:
    from ernie_serve.cli import build_parser

    args = build_parser().parse_args(["export", "onnx", "--model", "m", "--output", "o"])
    assert (args.model, args.output, args.load_format, args.seed) == ("m", "o", "auto", 0)


def test_the_cli_works_without_the_onnx_extra() -> None:
    """A plain `pip install ernie-serve` has neither numpy nor onnx: the CLI must still start, list the onnx
    backend as unavailable with the reason, and answer `export onnx` with one line."""
    import subprocess
    import sys

    blocked = "import sys\nfor m in ('numpy', 'onnx', 'onnxruntime'): sys.modules[m] = None\n"
    script = blocked + (
        "from ernie_serve.cli import main\n"
        "assert main(['plugins']) == 0\n"
        "sys.exit(main(['export', 'onnx', '--model', 'demo', '--output', 'unused']))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    onnx_line = next(line for line in run.stdout.splitlines() if line.strip().startswith("onnx "))
    assert "pip install" in onnx_line
    assert "export onnx needs" in run.stderr and "Traceback" not in run.stderr


# ----- streamed weights -----


class _CountingWeights(export_mod.StreamedWeights):
    """Counts the tensors handed out that are still alive, at every request."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.alive: set[int] = set()
        self.most_alive = 0
        self.requests = 0

    def __getitem__(self, name: str):
        tensor = super().__getitem__(name)
        self.requests += 1
        key = self.requests
        self.alive.add(key)
        weakref.finalize(tensor, self.alive.discard, key)
        self.most_alive = max(self.most_alive, len(self.alive))
        return tensor


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
@pytest.mark.parametrize("source", ["pt", "paddle", "dummy"])
def test_the_export_streams_one_tensor_at_a_time_and_writes_what_the_whole_model_gives(
    tiny_checkpoint, paddle_checkpoint, tmp_path, monkeypatch, shape, source
) -> None:
    """The exported files are byte for byte those of a graph built from the whole torch model (float32,
    quantized with QMoE experts, and the TensorRT flavour in bfloat16), while at most a few of the tensors the
    builder asked for are alive at any time."""
    path = {"pt": tiny_checkpoint(shape, torch.float32), "paddle": paddle_checkpoint(shape), "dummy": None}[source]
    config = read_model_config(path or tiny_checkpoint(shape, torch.float32))
    made: list[_CountingWeights] = []
    monkeypatch.setattr(export_mod, "StreamedWeights", lambda *a: made.append(_CountingWeights(*a)) or made[-1])
    variants = [
        ExportOptions(),
        ExportOptions(quantization=QuantSpec.of("wint8", 128)),
        ExportOptions(graph_flavour="tensorrt", dtype="bfloat16"),
    ]
    for i, options in enumerate(variants):
        streamed, whole = tmp_path / f"streamed{i}", tmp_path / f"whole{i}"
        export_mod.export_to_dir(config, None if path is None else str(path), streamed, 5, options, check=False)
        model = export_mod.build_torch_model(config, None if path is None else str(path), 5, options.dtype)
        save_graph(
            config, dict(model.checkpoint_targets()), whole, "model.onnx", options.graph_quantization(),
            options.graph_flavour, options.dtype,
        )  # fmt: skip
        for name in ("model.onnx", "model.onnx.data"):
            assert (streamed / name).read_bytes() == (whole / name).read_bytes(), (options, name)
    assert len(made) == len(variants)
    for weights in made:
        assert weights.requests >= len(weights) and not weights.alive
        assert weights.most_alive <= 3, weights.most_alive


def test_a_wrong_checkpoint_is_refused_from_its_headers_before_the_export_reads_it(tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint("moe_shared_tied", torch.float32)
    config = read_model_config(source)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors |= load_file(str(file))
    cases = {
        "missing tensor 'model.layers.1.mlp.experts.2.up_proj.weight'": lambda t: t.pop(
            "model.layers.1.mlp.experts.2.up_proj.weight"
        ),
        "unexpected tensor 'model.layers.9.input_layernorm.weight'": lambda t: t.update(
            {"model.layers.9.input_layernorm.weight": torch.ones(config.hidden_size)}
        ),
        r"has shape \(64, 63\), expected \(64, 64\)": lambda t: t.update(
            {"model.layers.0.self_attn.o_proj.weight": torch.ones(64, 63)}
        ),
    }
    for i, (message, edit) in enumerate(cases.items()):
        broken = tmp_path / f"broken{i}"
        broken.mkdir()
        shutil.copy(source / "config.json", broken / "config.json")
        edited = dict(tensors)
        edit(edited)
        save_file(edited, str(broken / "model.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            export_mod.export_to_dir(config, str(broken), tmp_path / f"out{i}", 0, ExportOptions(), check=False)
        assert not (tmp_path / f"out{i}" / "model.onnx").exists()
