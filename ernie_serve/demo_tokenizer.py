"""A small ERNIE-shaped tokenizer, trained on the spot, for the built-in demo model and tests' checkpoints.

Real ERNIE tokenizers are 103k-piece SentencePiece models that would have to be downloaded; this is a
byte-level BPE (any text round-trips, emoji and Chinese included) with ERNIE's special tokens at ERNIE's ids
and ERNIE's chat template, trained in well under a second on a bundled corpus. Training is deterministic:
the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ernie_serve.tokenizer import ERNIE_CHAT_TEMPLATE

# ERNIE 4.5's special tokens at its ids 0..9 (REFERENCE.md); the BPE trainer gives them the ids in order.
DEMO_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<mask:1>",
    "<mask:4>",
    "<mask:5>",
    "<mask:6>",
    "<mask:7>",
)


def demo_corpus() -> str:
    """The bundled training text: original mixed English/Chinese prose plus numbers, code and emoji."""
    return (Path(__file__).parent / "data" / "demo_corpus.txt").read_text(encoding="utf-8")


def build_demo_tokenizer(out_dir: Path, vocab_size: int = 2048) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir` (created if needed).

    Called when the demo model is set up and by tests building tiny checkpoints. `vocab_size` counts the
    special tokens and the 256 byte symbols; the bundled corpus supports up to about 5000.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give back exactly `text`, and ERNIE adds no BOS either.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        # All 256 byte symbols, so text the corpus never showed (other scripts, rare emoji) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus().splitlines(keepends=True), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the demo corpus yields at most {tokenizer.get_vocab_size()} tokens, asked for {vocab_size}")
    tokenizer.save(str(out_dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(DEMO_SPECIAL_TOKENS)
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "additional_special_tokens": list(DEMO_SPECIAL_TOKENS[5:]),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": ERNIE_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
