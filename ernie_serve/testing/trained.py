"""A small ERNIE-4.5-MoE model trained on this machine: trained weights for measuring what quantization costs.

No trained ERNIE checkpoint can be downloaded where ernie-serve is tested, and random weights are a poor stand-in
for accuracy figures: a random model's next-token distributions are nearly flat, so a rounding error flips its
argmax far more often than it would a trained model's (docs/quantization.md, "Accuracy and memory"). This module
trains one, deterministically, on text every Python installation carries: the reference documentation's topics
(`pydoc_data`) and the standard library's top-level modules' source. Every tenth document is held out; accuracy
is measured on held-out text, so the model is uncertain where a trained model would be.

The model has the built-in demo model's shape (4 layers, hidden 256, 8 routed experts top-2 and a shared one,
the first layer dense, tied embeddings) and tokenizer. It is trained with transformers' ERNIE 4.5 MoE
implementation (with its router load-balancing loss) and saved by its `save_pretrained` in bfloat16, the layout
of the published -PT checkpoints; transformers is a test dependency (`pip install 'ernie-serve[test]'`).
About ten minutes on two cores; the result is cached (`cache_root()`).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ernie_serve.core.config import ModelConfig
from ernie_serve.demo import DEMO_CONFIG, cache_root, hf_config_dict
from ernie_serve.demo_tokenizer import build_demo_tokenizer, train_demo_tokenizer
from ernie_serve.logging import progress
from ernie_serve.testing.checkpoints import hf_model_class

TRAINED_VERSION = "1"
TRAIN_STEPS = 800  # about ten minutes here; the held-out loss still falls at the end
BATCH, WINDOW = 16, 128  # sequences per step, tokens per sequence
HELD_OUT_EVERY = 10  # every tenth document (in sorted order) is held out
ROUTER_AUX_LOSS = 0.01  # weight of transformers' router load-balancing loss in the training loss


def corpus_documents() -> list[str]:
    """The corpus, in a fixed order: the documentation topics (sorted by name), then the standard library's
    top-level `.py` files (sorted by name). Its text, and so which documents are held out, depends on the Python
    version: the cached model is kept per version (`trained_checkpoint`)."""
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    library = Path(sysconfig.get_paths()["stdlib"])
    sources = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(library.glob("*.py"))]
    return topics + sources


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): what `train` learns from, and what the accuracy prompts and the
    held-out loss are cut from."""
    held_out = [doc for i, doc in enumerate(documents) if i % HELD_OUT_EVERY == 0]
    training = [doc for i, doc in enumerate(documents) if i % HELD_OUT_EVERY != 0]
    return training, held_out


def token_stream(documents: list[str]) -> torch.Tensor:
    """Every document's tokens, each followed by </s>, as one `[N]` int64 tensor: the text `train` samples its
    windows from."""
    tokenizer = train_demo_tokenizer()
    eos = trained_config().eos_token_ids[0]
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids += encoding.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


@functools.cache
def _held_out_token_ids() -> tuple[tuple[int, ...], ...]:
    """Each held-out document's tokens, tokenized once per process (the corpus is fixed for a Python)."""
    _, held_out = split_documents(corpus_documents())
    return tuple(tuple(encoding.ids) for encoding in train_demo_tokenizer().encode_batch(held_out))


def held_out_sequences(num: int, length: int) -> list[torch.Tensor]:
    """`num` windows of `length` held-out tokens (the accuracy measurement's fixed prompts): every held-out
    document cut into consecutive windows, and `num` of those taken evenly across them."""
    if num < 1 or length < 1:
        raise ValueError(f"held-out windows: need at least one window of at least one token (got {num} of {length})")
    windows = [
        torch.tensor(ids[start : start + length])
        for ids in _held_out_token_ids()
        for start in range(0, len(ids) - length + 1, length)
    ]
    if len(windows) < num:
        raise ValueError(f"the held-out text has {len(windows)} windows of {length} tokens; {num} asked")
    stride = len(windows) / num
    return [windows[int(i * stride)] for i in range(num)]


def trained_config() -> ModelConfig:
    """The trained model's shape (the demo model's): what `train` builds and what the measurements load the
    checkpoint as."""
    return DEMO_CONFIG


def _hf_config(config: ModelConfig) -> Any:  # a transformers Ernie4_5_MoeConfig
    config_cls, _ = hf_model_class("ernie4_5_moe")
    fields = {k: v for k, v in hf_config_dict(config).items() if k != "dtype"}  # trained in float32
    # the router load-balancing loss: without it routing collapses onto a few experts
    return config_cls(**fields, output_router_logits=True, router_aux_loss_coef=ROUTER_AUX_LOSS)


def _learning_rate(step: int, steps: int, peak: float = 3e-3) -> float:
    """Linear warm-up over the first 5% of steps, then a cosine down to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


@torch.no_grad()
def _held_out_loss(model: Any, sequences: list[torch.Tensor]) -> float:
    """The language-model loss (nats a token; the router's balancing loss left out) on `sequences`."""
    model.eval()
    batch = torch.stack(sequences)  # [B, L]
    loss = float(model(input_ids=batch, labels=batch, output_router_logits=False).loss)
    model.train()
    return loss


def train(out_dir: Path, steps: int = TRAIN_STEPS, seed: int = 0) -> dict[str, Any]:
    """Train the model for `steps` steps and write the checkpoint (weights, config, tokenizer, `training.json`)
    into `out_dir`; returns the training summary `training.json` holds. Called by `trained_checkpoint` on first
    use (and by tests, for a few steps)."""
    _, model_cls = hf_model_class("ernie4_5_moe")
    training, _ = split_documents(corpus_documents())
    stream = token_stream(training)  # [N]
    evaluation = held_out_sequences(BATCH, WINDOW + 1)
    torch.manual_seed(seed)
    model = model_cls(_hf_config(trained_config())).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_learning_rate(0, steps), betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    losses: list[float] = []
    bar = progress(range(steps), "training the quantization-accuracy model", unit="step")
    for step in bar:
        starts = torch.randint(0, stream.shape[0] - WINDOW, (BATCH,), generator=generator)  # [B]
        batch = torch.stack([stream[s : s + WINDOW] for s in starts.tolist()])  # [B, W]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        outputs = model(input_ids=batch, labels=batch)
        loss = outputs.loss  # the language-model loss + ROUTER_AUX_LOSS x the router's balancing loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach() - ROUTER_AUX_LOSS * outputs.aux_loss.detach()))  # the language model's
    summary = {
        "steps": steps,
        "tokens_seen": steps * BATCH * WINDOW,
        "training_tokens": int(stream.shape[0]),
        "final_training_loss": sum(losses[-20:]) / len(losses[-20:]),  # mean of the last 20 steps
        "held_out_loss": _held_out_loss(model, evaluation),
        "seconds": round(time.monotonic() - started, 1),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    build_demo_tokenizer(out_dir)
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cached_checkpoint_dir(steps: int = TRAIN_STEPS) -> Path:
    """Where `trained_checkpoint` keeps the model trained for `steps` steps: per Python version, since the corpus
    (and so which text is held out) is this Python's."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"trained-moe-v{TRAINED_VERSION}-{steps}-{python}"


def trained_checkpoint(steps: int = TRAIN_STEPS) -> Path:
    """The trained checkpoint's directory, trained on first call and cached (`cached_checkpoint_dir`); built in
    a temporary directory and renamed, so an interrupted run leaves no half-written model where this looks."""
    target = cached_checkpoint_dir(steps)
    if (target / "training.json").is_file():
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but holds no training.json: remove it, and it is trained again")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".trained-", dir=target.parent))
    try:
        train(scratch, steps)
        scratch.rename(target)
    except OSError:
        if not (target / "training.json").is_file():  # else another process finished first: use its model
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
