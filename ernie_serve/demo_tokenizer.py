"""A small ERNIE-shaped tokenizer, trained on the spot, for the built-in demo model, preset shapes and tests.

Real ERNIE tokenizers are 103k-piece SentencePiece models that would have to be downloaded; this is a
byte-level BPE (any text round-trips, emoji and Chinese included) with ERNIE's special tokens and ERNIE's chat
template, trained in well under a second on a bundled corpus. Training is deterministic: the same arguments
give byte-identical files.

Three uses: `build_demo_tokenizer` writes it into a checkpoint directory (the demo model, tests' tiny
checkpoints); `padded_demo_tokenizer` builds it in memory, padded with placeholder tokens up to a preset's
103,424-id vocabulary, so a `--load-format dummy` preset has a tokenizer for every id it can sample and
nothing is written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ernie_serve.tokenizer import ERNIE_TOOLS_CHAT_TEMPLATE, MARKUP_TOKENS, Tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RustTokenizer

# ERNIE 4.5's special tokens in REFERENCE.md's order, which the BPE trainer turns into ids 0..9: <unk>, <s>
# and </s> land on ERNIE's real ids 0, 1 and 2; REFERENCE.md gives no ids for the rest.
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

# The demo model's tokenizer size; the bundled corpus supports up to about 5000.
DEMO_VOCAB_SIZE = 2048

# ERNIE's reasoning and tool-call tags, special tokens with the last ids (the BPE is trained `len(DEMO_MARKUP)` ids
# short of the size), single tokens as in ERNIE's Thinking models: grammars force them as such, and decoding
# keeps them in the text for the output parsers.
DEMO_MARKUP = MARKUP_TOKENS

# Text of the padding ids of `padded_demo_tokenizer`. Visible when decoded (a dummy-weight model samples them
# often), never produced by encoding text, and plainly not a word.
PLACEHOLDER_TOKEN = "<|placeholder_{}|>"


def demo_corpus() -> str:
    """The bundled training text: original mixed English/Chinese prose plus numbers, code and emoji."""
    return (Path(__file__).parent / "data" / "demo_corpus.txt").read_text(encoding="utf-8")


def train_demo_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE) -> RustTokenizer:
    """The demo byte-level BPE as an in-memory `tokenizers.Tokenizer` (what tokenizer.json holds).

    `vocab_size` counts the special tokens (markup included) and the 256 byte symbols; ValueError beyond what the
    corpus yields.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    tokenizer = RustTokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give back exactly `text`, and ERNIE adds no BOS either.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DEMO_MARKUP),
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        # All 256 byte symbols, so text the corpus never showed (other scripts, rare emoji) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus().splitlines(keepends=True), trainer)
    most = tokenizer.get_vocab_size() + len(DEMO_MARKUP)
    if most != vocab_size:
        raise ValueError(f"the demo corpus yields at most {most} tokens, asked for {vocab_size}")
    tokenizer.add_special_tokens([AddedToken(tag, special=True, normalized=False) for tag in DEMO_MARKUP])
    return tokenizer


def demo_tokenizer_config() -> dict[str, Any]:
    """What the demo tokenizer's tokenizer_config.json says: ERNIE's special-token slots, and ERNIE's chat template
    with tools and thinking (`ERNIE_TOOLS_CHAT_TEMPLATE`)."""
    return {
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
        "additional_special_tokens": [*DEMO_SPECIAL_TOKENS[5:], *DEMO_MARKUP],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": ERNIE_TOOLS_CHAT_TEMPLATE,
    }


def build_demo_tokenizer(out_dir: Path, vocab_size: int = DEMO_VOCAB_SIZE) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir` (created if needed).

    Called when the demo model is set up and by tests building tiny checkpoints.
    """
    tokenizer = train_demo_tokenizer(vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(demo_tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def padded_demo_tokenizer(vocab_size: int, chat_template: str | None = None) -> Tokenizer:
    """The demo tokenizer with ids `DEMO_VOCAB_SIZE .. vocab_size - 1` filled by placeholder tokens, built in
    memory (nothing is written); the tokenizer of a preset shape run without `--tokenizer`.

    Every id the model can sample then decodes to something (`<|placeholder_5000|>`), while text still
    encodes with the demo BPE alone and round-trips exactly. Special tokens and the chat template are the demo
    tokenizer's. `chat_template` overrides the template as in `Tokenizer.from_pretrained`.
    """
    if vocab_size < DEMO_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the demo tokenizer's {DEMO_VOCAB_SIZE}")
    from tokenizers import Tokenizer as RustTokenizer

    # Placeholders go into the BPE model's vocabulary without merges, so no text can ever encode to them (as
    # added tokens they would be matched in prompt text, and 100k of them would slow every encode).
    serialized = json.loads(train_demo_tokenizer(DEMO_VOCAB_SIZE).to_str())
    vocab: dict[str, int] = serialized["model"]["vocab"]
    vocab.update({PLACEHOLDER_TOKEN.format(i): i for i in range(DEMO_VOCAB_SIZE, vocab_size)})
    # Added tokens outside the model's vocabulary get new ids past it when loaded; in it, they keep theirs.
    vocab.update({token["content"]: token["id"] for token in serialized["added_tokens"]})
    padded = RustTokenizer.from_str(json.dumps(serialized))
    return Tokenizer.from_tokenizers(padded, demo_tokenizer_config(), chat_template=chat_template)
