"""Model resolution: what `--model` and `--tokenizer` name, and the tokenizer each case gets (issue 9, bug 6:
a preset got the 2,048-token demo tokenizer for its 103,424-id vocabulary and wrote the demo checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ernie_serve import LLM, SamplingParams
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.errors import UserError
from ernie_serve.demo import DEMO_CONFIG, hf_config_dict
from ernie_serve.demo_tokenizer import DEMO_VOCAB_SIZE, build_demo_tokenizer
from ernie_serve.models import PRESETS, ModelResolutionError, ResolvedModel, resolve_model
from ernie_serve.tokenizer import Tokenizer

TEXTS = ["Hello world! 你好，世界。", "Emoji 😀🎉 and code: def f(x):\n    return x\n", ""]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory (and home, its fallback), to see whether resolution writes anything."""
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _checkpoint(out: Path, vocab_size: int, tokenizer: bool = True) -> Path:
    """A checkpoint directory without weights (enough for `--load-format dummy`), with a generation config."""
    out.mkdir(parents=True)
    config = replace(DEMO_CONFIG, vocab_size=vocab_size)
    (out / "config.json").write_text(json.dumps(hf_config_dict(config)))
    (out / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": None, "eos_token_id": 2}))
    if tokenizer:
        build_demo_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def preset_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResolvedModel, Tokenizer, list[str]]:
    """The 21B-A3B preset resolved as `--model ernie-4.5-21b-a3b --load-format dummy`, its tokenizer, and
    whatever that wrote to the (initially empty) cache."""
    root = tmp_path_factory.mktemp("preset-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ERNIE_SERVE_CACHE", str(root))
        mp.setenv("HOME", str(root / "home"))
        resolved = resolve_model(EngineSettings(model="ernie-4.5-21b-a3b", load_format="dummy"))
        tokenizer = resolved.load_tokenizer()
    return resolved, tokenizer, _written(root)


# -- presets ----------------------------------------------------------------------------------------------


def test_preset_writes_nothing(preset_tokenizer: tuple[ResolvedModel, Tokenizer, list[str]]) -> None:
    resolved, _, written = preset_tokenizer
    assert written == []
    assert resolved.weights_path is None and resolved.tokenizer_path is None
    assert resolved.config == PRESETS["ernie-4.5-21b-a3b"] and resolved.generation_defaults == {}


def test_preset_tokenizer_covers_the_vocabulary(preset_tokenizer: tuple[ResolvedModel, Tokenizer, list[str]]) -> None:
    resolved, tokenizer, _ = preset_tokenizer
    assert tokenizer.vocab_size == resolved.config.vocab_size == 103_424
    # The highest id the model can sample has text; the demo tokenizer alone ended at 2,047.
    assert tokenizer.decode_token(103_423) == "<|placeholder_103423|>"
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_preset_tokenizer_special_tokens(preset_tokenizer: tuple[ResolvedModel, Tokenizer, list[str]]) -> None:
    resolved, tokenizer, _ = preset_tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.stop_token_ids == frozenset({2, 4})
    assert set(resolved.config.eos_token_ids) <= tokenizer.stop_token_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|begin_of_sentence|>User: hi\nAssistant: "
    assert tokenizer.encode(prompt)[0] == tokenizer.token_to_id("<|begin_of_sentence|>") == 3


def test_preset_chat_template_override(cache: Path) -> None:
    resolved = resolve_model(EngineSettings(model="ernie-4.5-0.3b", load_format="dummy"))
    tokenizer = resolved.load_tokenizer(chat_template="{{ messages[0]['content'] }}!")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    assert _written(cache) == []


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_needs_dummy_weights(name: str, cache: Path) -> None:
    with pytest.raises(ModelResolutionError, match="--load-format dummy"):
        resolve_model(EngineSettings(model=name))
    assert resolve_model(EngineSettings(model=name, load_format="dummy")).tokenizer_path is None
    assert _written(cache) == []


def test_preset_with_tokenizer_flag(tmp_path: Path, cache: Path) -> None:
    build_demo_tokenizer(tmp_path / "tok", vocab_size=512)
    settings = EngineSettings(model="ernie-4.5-21b-a3b", load_format="dummy", tokenizer=str(tmp_path / "tok"))
    resolved = resolve_model(settings)
    assert resolved.tokenizer_path == str(tmp_path / "tok")
    assert resolved.load_tokenizer().vocab_size == 512
    assert _written(cache) == []


# -- checkpoint directories and --tokenizer ---------------------------------------------------------------


def test_checkpoint_directory(tmp_path: Path, cache: Path) -> None:
    path = _checkpoint(tmp_path / "ckpt", vocab_size=2112)
    resolved = resolve_model(EngineSettings(model=str(path)))
    assert (resolved.weights_path, resolved.tokenizer_path) == (str(path), str(path))
    assert resolved.config.vocab_size == 2112
    assert resolved.generation_defaults == {"temperature": 0.6}  # a null top_p is no default
    assert resolved.load_tokenizer().vocab_size == DEMO_VOCAB_SIZE
    assert resolve_model(EngineSettings(model=str(path), load_format="dummy")).weights_path is None
    assert _written(cache) == []


def test_tokenizer_flag_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "small", vocab_size=1000, tokenizer=False)
    big = tmp_path / "big-tokenizer"
    build_demo_tokenizer(big)
    resolved = resolve_model(EngineSettings(model=str(model), load_format="dummy", tokenizer=str(big)))
    with pytest.raises(ModelResolutionError, match=r"--tokenizer .*big-tokenizer has 2,048 token ids.* 1,000"):
        resolved.load_tokenizer()
    # The same tokenizer shipped inside a checkpoint is the checkpoint authors' pairing, and is loaded.
    own = _checkpoint(tmp_path / "own", vocab_size=1000)
    assert resolve_model(EngineSettings(model=str(own), load_format="dummy")).load_tokenizer().vocab_size == 2048


def test_unknown_model_names_the_choices(tmp_path: Path) -> None:
    message = "neither a checkpoint directory, a HuggingFace model id \\(owner/name\\), 'demo', nor a preset.*21b-a3b"
    with pytest.raises(ModelResolutionError, match=message):
        resolve_model(EngineSettings(model=str(tmp_path / "missing")))


def test_missing_tokenizer_directory_names_the_flag(tmp_path: Path) -> None:
    settings = EngineSettings(model="ernie-4.5-0.3b", load_format="dummy", tokenizer=str(tmp_path / "nope"))
    with pytest.raises(ModelResolutionError, match="--tokenizer .*nope.* is not a directory"):
        resolve_model(settings)


def test_resolution_errors_are_user_errors() -> None:
    # One line from the CLI, no traceback; and a ValueError for callers that already catch that.
    assert issubclass(ModelResolutionError, UserError) and issubclass(ModelResolutionError, ValueError)


# -- HuggingFace model ids --------------------------------------------------------------------------------
# huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so each case runs in a fresh process
# with the environment a user would have set. The hub cache is laid out as huggingface_hub writes it, except
# that snapshots hold copies instead of links into blobs/ (read the same way).

MAIN_SHA, V2_SHA = "1" * 40, "2" * 40
_RESOLVE = """
import json, sys
from ernie_serve.core.config import EngineSettings
from ernie_serve.models import ModelResolutionError, resolve_model
results = []
for model, revision in json.loads(sys.argv[1]):
    try:
        resolved = resolve_model(EngineSettings(model=model, revision=revision))
        results.append({"weights": resolved.weights_path, "tokenizer": resolved.tokenizer_path})
    except ModelResolutionError as exc:
        results.append({"error": str(exc)})
print(json.dumps(results))
"""


def _hub_cache(hf_home: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """`hf_home/hub/models--owner--name/` with `snapshots/<sha>/` copied from checkpoint directories and
    `refs/<branch or tag>` holding a sha (no newline, as huggingface_hub writes it)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    for sha, checkpoint in snapshots.items():
        shutil.copytree(checkpoint, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)
    return repo


def _hub_env(hf_home: Path, **extra: str) -> dict[str, str]:
    drop = ("ERNIE_SERVE_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"HF_HOME": str(hf_home)} | extra


def _resolve_in_a_fresh_process(env: dict[str, str], cases: list[tuple[str, str | None]]) -> list[dict[str, str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE, json.dumps(cases)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once (no network involved)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint, paddle_checkpoint) -> Path:
    """A HuggingFace cache with `baidu/ERNIE-4.5-Tiny-PT` (main and tag v2: two snapshots) and
    `baidu/ERNIE-4.5-Tiny-Paddle` (main)."""
    home = tmp_path_factory.mktemp("hf-home")
    pt = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    _hub_cache(home, "baidu/ERNIE-4.5-Tiny-PT", {MAIN_SHA: pt, V2_SHA: pt}, {"main": MAIN_SHA, "v2": V2_SHA})
    _hub_cache(
        home, "baidu/ERNIE-4.5-Tiny-Paddle", {MAIN_SHA: paddle_checkpoint("moe_shared_tied")}, {"main": MAIN_SHA}
    )
    return home


def test_model_ids_resolve_from_the_hub_cache_offline(hf_home: Path) -> None:
    snapshots = hf_home / "hub" / "models--baidu--ERNIE-4.5-Tiny-PT" / "snapshots"
    cases = [
        ("baidu/ERNIE-4.5-Tiny-PT", None),
        ("baidu/ERNIE-4.5-Tiny-PT", "v2"),
        ("baidu/ERNIE-4.5-Tiny-PT", MAIN_SHA),
        ("baidu/ERNIE-4.5-Tiny-PT", "v3"),
        ("baidu/ERNIE-4.5-Absent", None),
    ]
    results = _resolve_in_a_fresh_process(_hub_env(hf_home, HF_HUB_OFFLINE="1"), cases)
    assert results[:3] == [
        {"weights": str(snapshots / MAIN_SHA), "tokenizer": str(snapshots / MAIN_SHA)},
        {"weights": str(snapshots / V2_SHA), "tokenizer": str(snapshots / V2_SHA)},
        {"weights": str(snapshots / MAIN_SHA), "tokenizer": str(snapshots / MAIN_SHA)},
    ]
    cache = hf_home / "hub"
    assert results[3:] == [
        {
            "error": f"--model baidu/ERNIE-4.5-Tiny-PT at --revision v3 is not (wholly) in the HuggingFace cache "
            f"({cache}) and HF_HUB_OFFLINE is set: download it once with network access, or pass a local "
            "checkpoint directory"
        },
        {
            "error": f"--model baidu/ERNIE-4.5-Absent is not (wholly) in the HuggingFace cache ({cache}) and "
            "HF_HUB_OFFLINE is set: download it once with network access, or pass a local checkpoint directory"
        },
    ]


def test_unreachable_hub_falls_back_to_the_cache_or_says_so(hf_home: Path) -> None:
    env = _hub_env(hf_home, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    cached, absent = _resolve_in_a_fresh_process(
        env, [("baidu/ERNIE-4.5-Tiny-PT", None), ("baidu/ERNIE-4.5-Absent", None)]
    )
    assert cached["weights"] == str(hf_home / "hub" / "models--baidu--ERNIE-4.5-Tiny-PT" / "snapshots" / MAIN_SHA)
    assert absent == {
        "error": "--model baidu/ERNIE-4.5-Absent could not be downloaded (the HuggingFace Hub cannot be reached) and "
        f"is not (wholly) in the cache ({hf_home / 'hub'}): check the network, or pass a local checkpoint directory"
    }


def test_a_paddle_model_id_serves_from_the_cache(hf_home: Path, paddle_checkpoint) -> None:
    script = Path(sys.executable).parent / "ernie-serve"
    argv = ["generate", "--model", "baidu/ERNIE-4.5-Tiny-Paddle", "--temperature", "0", "--max-tokens", "8", "hello"]
    env = _hub_env(hf_home, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with LLM(model=str(paddle_checkpoint("moe_shared_tied"))) as llm:
        text = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert proc.stdout == text + "\n"


def test_a_local_directory_wins_over_the_model_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _checkpoint(tmp_path / "baidu" / "ERNIE-4.5-21B-A3B-PT", vocab_size=DEMO_VOCAB_SIZE)
    resolved = resolve_model(EngineSettings(model="baidu/ERNIE-4.5-21B-A3B-PT", load_format="dummy"))
    assert resolved.tokenizer_path == "baidu/ERNIE-4.5-21B-A3B-PT" and resolved.weights_path is None


def test_revision_without_a_model_id_is_reported_as_having_no_effect(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ernie_serve.models"):
        resolve_model(EngineSettings(model="ernie-4.5-0.3b", load_format="dummy", revision="v2"))
    assert [r.getMessage() for r in caplog.records] == [
        "--revision v2 has no effect: --model ernie-4.5-0.3b is not a HuggingFace model id"
    ]
