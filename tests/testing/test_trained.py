"""The model trained here for quantization accuracy: a fixed corpus split, held-out prompts, and a training run
whose checkpoint our loader reads exactly as transformers does."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ernie_serve.bench.quantization import build_model, teacher_forced_logits
from ernie_serve.testing.checkpoints import hf_model_class
from ernie_serve.testing.trained import (
    BATCH,
    HELD_OUT_EVERY,
    WINDOW,
    cached_checkpoint_dir,
    corpus_documents,
    held_out_sequences,
    split_documents,
    token_stream,
    trained_checkpoint,
    trained_config,
)


def test_the_split_is_fixed_and_holds_out_every_tenth_document() -> None:
    documents = corpus_documents()
    assert documents == corpus_documents() and len(documents) > 200
    training, held_out = split_documents(documents)
    assert len(held_out) == math.ceil(len(documents) / HELD_OUT_EVERY)
    assert len(training) + len(held_out) == len(documents)
    assert held_out[0] == documents[0] and held_out[1] == documents[HELD_OUT_EVERY]
    assert documents[1] in training


def _occurs(window: torch.Tensor, stream: torch.Tensor) -> bool:
    """Whether the token run `window` occurs in `stream` (both int token ids), by a search over their bytes
    that counts only matches on token boundaries."""
    needle, haystack = window.to(torch.int32).numpy().tobytes(), stream.to(torch.int32).numpy().tobytes()
    at = haystack.find(needle)
    while at != -1 and at % 4:
        at = haystack.find(needle, at + 1)
    return at != -1


def test_held_out_windows_come_from_held_out_text_only() -> None:
    windows = held_out_sequences(5, 40)
    assert [w.shape for w in windows] == [torch.Size([40])] * 5
    assert all(torch.equal(a, b) for a, b in zip(windows, held_out_sequences(5, 40), strict=True))
    assert len({tuple(w.tolist()) for w in windows}) == 5
    training, held_out = split_documents(corpus_documents())
    held_out_stream, training_stream = token_stream(held_out), token_stream(training)
    assert all(_occurs(w, held_out_stream) for w in windows)
    assert not any(_occurs(w, training_stream) for w in windows)  # what the model trains on
    assert len(held_out_sequences(64, 128)) == 64  # the bench's --trained --sequences 64
    with pytest.raises(ValueError, match="at least one window"):
        held_out_sequences(0, 128)


def test_a_cache_entry_without_its_training_summary_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(tmp_path))
    cached_checkpoint_dir().mkdir()  # e.g. a copy that stopped half-way
    with pytest.raises(FileExistsError, match="holds no training.json"):
        trained_checkpoint()


def test_a_short_training_run_learns_and_our_loader_reads_it_as_transformers_does(briefly_trained_model) -> None:
    summary = json.loads((briefly_trained_model / "training.json").read_text())
    config = trained_config()
    # from uniform (log V nats) towards the text's statistics in a few steps
    assert summary["held_out_loss"] < math.log(config.vocab_size) - 0.5
    assert 0 < summary["steps"] < 20 and summary["tokens_seen"] == summary["steps"] * BATCH * WINDOW
    assert summary["training_tokens"] > 1_000_000
    assert (briefly_trained_model / "tokenizer.json").is_file()

    window = held_out_sequences(1, 64)[0]
    ours = teacher_forced_logits(build_model(config, briefly_trained_model, None), window)  # [64, V]
    _, model_cls = hf_model_class("ernie4_5_moe")
    reference = model_cls.from_pretrained(briefly_trained_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=window[None]).logits[0]  # [64, V]
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_the_bench_measures_the_cached_trained_model(trained_model_cached, capsys) -> None:
    from ernie_serve.bench.quantization import Variant, main
    from ernie_serve.quantization import QuantSpec

    assert trained_checkpoint() == trained_model_cached  # found, not trained again
    assert main(variants=[Variant(QuantSpec("wint8"))], num_sequences=2, length=32, trained=True) == 0
    out = capsys.readouterr().out
    steps = json.loads((trained_model_cached / "training.json").read_text())["steps"]
    assert f": {steps} steps" in out and "held-out loss" in out and "float32 on the held-out windows" in out
    row = next(line for line in out.splitlines() if line.startswith("trained MoE"))
    assert row.split()[-3] == "64"  # positions: 2 windows of 32
