"""Tokenizer: both file formats, in-memory construction, special tokens, out-of-vocab ids, the chat template,
the demo tokenizer and its placeholder-padded form for preset shapes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_serve.demo_tokenizer import (
    DEMO_SPECIAL_TOKENS,
    DEMO_VOCAB_SIZE,
    build_demo_tokenizer,
    demo_corpus,
    demo_tokenizer_config,
    padded_demo_tokenizer,
    train_demo_tokenizer,
)
from ernie_serve.tokenizer import (
    ERNIE_CHAT_TEMPLATE,
    ERNIE_TOOLS_CHAT_TEMPLATE,
    MARKUP_TOKENS,
    ChatTemplateError,
    Tokenizer,
)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。今天天气很好，我们去公园散步吧！",
    "Emoji 😀🎉👍🏽 and flags 🇨🇳 mixed with 中文 and English.",
    "  leading spaces, double  spaces and trailing space ",
    "tabs\tand\nnew\n\nlines\r\n",
    "def f(x: int) -> int:\n    return x ** 2  # 平方\n",
    "Numbers 3.14159, 1,000,000 and 2024-03-18T09:30:00Z; 50% off!",
    "Rare script: Ελληνικά, русский, עברית, ﷺ, and a zero width joiner 👩\u200d💻.",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! 你好"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
# REFERENCE.md's template applied to MESSAGES by hand: cls, system content with no role prefix, user turns
# end with a newline, assistant turns with <|end_of_sentence|>, then the generation prompt.
EXPECTED_PROMPT = (
    "<|begin_of_sentence|>You are a helpful assistant.\n"
    "User: Hi! 你好\n"
    "Assistant: Hello, how can I help?<|end_of_sentence|>"
    "User: Tell me a joke.\n"
    "Assistant: "
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-tokenizer")
    build_demo_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_dir)


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# -- the demo tokenizer ---------------------------------------------------------------------------------


def test_demo_tokenizer_is_deterministic(tmp_path: Path, demo_dir: Path) -> None:
    build_demo_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes()


def test_demo_tokenizer_shape(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 2048
    assert [tok.token_to_id(t) for t in DEMO_SPECIAL_TOKENS] == list(range(10))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.stop_token_ids == frozenset({2, 4})
    # ERNIE's reasoning and tool-call tags: special tokens with the last ids
    assert [tok.token_to_id(t) for t in MARKUP_TOKENS] == list(range(2042, 2048))
    assert tok.all_special_ids == [*range(10), *range(2042, 2048)]
    assert tok.chat_template == ERNIE_TOOLS_CHAT_TEMPLATE


def test_demo_tokenizer_vocab_size(tmp_path: Path) -> None:
    build_demo_tokenizer(tmp_path, vocab_size=512)
    assert Tokenizer.from_pretrained(tmp_path).vocab_size == 512
    with pytest.raises(ValueError, match="demo corpus"):
        build_demo_tokenizer(tmp_path, vocab_size=50_000)


def test_in_memory_equals_loaded_from_files(demo_dir: Path, tok: Tokenizer) -> None:
    # from_tokenizers is from_pretrained without the files: the same ids, specials and template.
    mem = Tokenizer.from_tokenizers(train_demo_tokenizer(), demo_tokenizer_config())
    assert mem.vocab_size == tok.vocab_size == DEMO_VOCAB_SIZE
    for text in [*TEXTS, EXPECTED_PROMPT]:
        assert mem.encode(text) == tok.encode(text)
    assert (mem.all_special_ids, mem.stop_token_ids, mem.eos_token_id) == (tok.all_special_ids, {2, 4}, 2)
    assert mem.apply_chat_template(MESSAGES) == EXPECTED_PROMPT
    assert Tokenizer.from_tokenizers(train_demo_tokenizer(), {}, chat_template=CUSTOM).chat_template == CUSTOM


PRESET_VOCAB = 103_424  # every ERNIE 4.5 preset's embedding (REFERENCE.md)


@pytest.fixture(scope="module")
def padded() -> Tokenizer:
    return padded_demo_tokenizer(PRESET_VOCAB)


def test_padded_tokenizer_covers_the_vocabulary(padded: Tokenizer, tok: Tokenizer) -> None:
    assert padded.vocab_size == len(padded) == PRESET_VOCAB
    last = PRESET_VOCAB - 1
    assert padded.convert_ids_to_tokens([2047, 2048, last, PRESET_VOCAB]) == [
        tok.convert_ids_to_tokens([2047])[0],
        "<|placeholder_2048|>",
        f"<|placeholder_{last}|>",
        None,
    ]
    # Any id a dummy-weight model samples decodes to visible text; ids past the vocabulary still to nothing.
    assert padded.decode_token(last) == f"<|placeholder_{last}|>"
    assert padded.decode([5000, 4, 70_000]) == "<|placeholder_5000|><|placeholder_70000|>"
    assert padded.decode([PRESET_VOCAB, -1]) == ""


@pytest.mark.parametrize("text", [*TEXTS, "a <|placeholder_5000|> in the text is just text"])
def test_padded_tokenizer_encodes_with_the_demo_bpe(padded: Tokenizer, tok: Tokenizer, text: str) -> None:
    ids = padded.encode(text)
    assert ids == tok.encode(text) and all(i < DEMO_VOCAB_SIZE for i in ids)
    assert padded.decode(ids) == text


def test_padded_tokenizer_special_tokens_and_template(padded: Tokenizer) -> None:
    assert [padded.token_to_id(t) for t in DEMO_SPECIAL_TOKENS] == list(range(10))
    assert (padded.bos_token_id, padded.eos_token_id, padded.pad_token_id) == (1, 2, 0)
    assert padded.stop_token_ids == frozenset({2, 4})
    assert padded.all_special_ids == [*range(10), *range(2042, 2048)]  # placeholders are ordinary tokens
    assert padded.apply_chat_template(MESSAGES) == EXPECTED_PROMPT
    assert padded.encode(EXPECTED_PROMPT)[0] == 3
    assert padded_demo_tokenizer(DEMO_VOCAB_SIZE, chat_template=CUSTOM).chat_template == CUSTOM
    with pytest.raises(ValueError, match="smaller than the demo tokenizer"):
        padded_demo_tokenizer(DEMO_VOCAB_SIZE - 1)


def test_demo_corpus_is_mixed_and_sized() -> None:
    corpus = demo_corpus()
    assert 15_000 <= len(corpus.encode()) <= 30_000
    assert sum("\u4e00" <= c <= "\u9fff" for c in corpus) > 1000


# -- encode / decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "".join(tok.decode_token(i) for i in tok.encode("plain ascii words")) == "plain ascii words"


def test_no_bos_added(tok: Tokenizer) -> None:
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=True)
    assert tok.bos_token_id not in tok.encode("hello", add_special_tokens=True)


def test_special_tokens_in_text(tok: Tokenizer) -> None:
    ids = tok.encode("<|begin_of_sentence|>User: hi\nAssistant: ok<|end_of_sentence|></s>")
    assert ids[0] == 3 and ids[-2:] == [4, 2]
    assert tok.decode(ids) == "User: hi\nAssistant: ok"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_sentence|>User: hi\nAssistant: ok<|end_of_sentence|></s>"
    )
    assert tok.decode_token(4) == "<|end_of_sentence|>"


def test_markup_tokens_are_kept_when_special_tokens_are_skipped(tok: Tokenizer) -> None:
    text = 'plan\n</think>\n\n<response>\nok\n</response>\n<tool_call>\n{"name": "f"}\n</tool_call>'
    ids = tok.encode(f"{text}<|end_of_sentence|></s>")
    assert [i for i in ids if i in tok.all_special_ids] == [2043, 2044, 2045, 2046, 2047, 4, 2]  # one token each
    assert tok.decode(ids) == text  # the parsers read the tags; the end of the turn is still skipped
    assert tok.decode(ids, skip_special_tokens=False) == text + "<|end_of_sentence|></s>"
    assert tok.decode([2042]) == "<think>" and tok.decode_token(2047) == "</tool_call>"


def test_out_of_vocab_ids(tok: Tokenizer) -> None:
    ids = tok.encode("fine")
    # Real checkpoints pad the embedding past the vocabulary, so a sampler can return such ids.
    assert tok.decode([*ids, tok.vocab_size, 103_423, 2**40, -1]) == "fine"
    assert tok.decode([tok.vocab_size + 5]) == ""
    assert tok.decode_token(tok.vocab_size) == ""
    assert tok.decode_token(-7) == ""
    tokens = tok.convert_ids_to_tokens([ids[0], tok.vocab_size, -1, 4])
    assert tokens[0] is not None and tokens[1:] == [None, None, "<|end_of_sentence|>"]


def test_decode_accepts_any_int_sequence(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor ids")
    assert tok.decode(torch.tensor(ids)) == tok.decode(tuple(ids)) == "tensor ids"


@pytest.mark.parametrize("skip", [True, False])
def test_matches_transformers(demo_dir: Path, tok: Tokenizer, skip: bool) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(demo_dir / "tokenizer.json"), clean_up_tokenization_spaces=False
    )
    texts = [*TEXTS, "<|begin_of_sentence|>User: 你好\nAssistant: hi<|end_of_sentence|>", demo_corpus()[:3000]]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        with_specials = [1, *ids, 4, 2]
        assert tok.decode(with_specials, skip_special_tokens=skip) == ref.decode(
            with_specials, skip_special_tokens=skip
        )
    assert tok.convert_ids_to_tokens(range(300)) == ref.convert_ids_to_tokens(list(range(300)))


def test_serving_does_not_import_transformers() -> None:
    code = (
        "import sys, ernie_serve.tokenizer, ernie_serve.detokenizer, ernie_serve.demo_tokenizer\n"
        "assert 'transformers' not in sys.modules and 'sentencepiece' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- loading --------------------------------------------------------------------------------------------


def test_missing_tokenizer_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_tokenizer_json_without_config(tmp_path: Path, demo_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((demo_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    # ERNIE's conventions fill in what a missing tokenizer_config.json would have said.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.stop_token_ids == frozenset({2, 4})
    assert tok.apply_chat_template(MESSAGES) == EXPECTED_PROMPT


def test_config_adds_missing_tokens(tmp_path: Path, demo_dir: Path) -> None:
    d = _copy_tokenizer(demo_dir, tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["additional_special_tokens"].append("<|IMAGE_PLACEHOLDER|>")
    config["eos_token"] = {"content": "</s>", "__type": "AddedToken"}  # the serialized-AddedToken form
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(d)
    new_id = tok.token_to_id("<|IMAGE_PLACEHOLDER|>")
    assert new_id == 2048 and tok.vocab_size == 2049 and new_id in tok.all_special_ids
    assert tok.encode("a<|IMAGE_PLACEHOLDER|>") == [*tok.encode("a"), new_id]
    assert tok.eos_token_id == 2


# -- chat template --------------------------------------------------------------------------------------


def test_chat_template_matches_reference(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(MESSAGES) == EXPECTED_PROMPT
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == EXPECTED_PROMPT.removesuffix("Assistant: ")
    assert tok.encode(EXPECTED_PROMPT)[0] == 3


def test_chat_template_matches_transformers(demo_dir: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(demo_dir))
    for gen in (True, False):
        expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected


TOOLS = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
TOOL_TURNS = [
    {"role": "user", "content": "weather?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": {"city": "巴黎"}}}],
    },
    {"role": "tool", "content": "sunny", "tool_call_id": "1"},
]


def test_tools_template_renders_tools_calls_results_and_thinking(tok: Tokenizer, demo_dir: Path) -> None:
    assert tok.apply_chat_template(TOOL_TURNS, tools=TOOLS, enable_thinking=False) == (
        "<|begin_of_sentence|>You can call the tools below, each described by a JSON schema:\n<tool_list>\n"
        '{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}\n'
        "</tool_list>\nTo call tools, answer with one block per call:\n<tool_call>\n"
        '{"name": "the tool\'s name", "arguments": {"a parameter": "its value"}}\n</tool_call>\n'
        "User: weather?\n"
        'Assistant: <tool_call>\n{"name": "w", "arguments": {"city": "巴黎"}}\n</tool_call>\n<|end_of_sentence|>'
        "User: <tool_response>\nsunny\n</tool_response>\n"
        "Assistant: <think>\n\n</think>\n\n"
    )
    assert tok.apply_chat_template(MESSAGES, enable_thinking=True) == EXPECTED_PROMPT + "<think>\n"
    assert tok.apply_chat_template(MESSAGES, tools=[]) == EXPECTED_PROMPT  # nothing to show: as ERNIE's template
    verbatim = Tokenizer.from_pretrained(demo_dir, chat_template=ERNIE_CHAT_TEMPLATE)
    assert verbatim.apply_chat_template(MESSAGES) == EXPECTED_PROMPT


def test_tools_template_matches_transformers(demo_dir: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(demo_dir))
    for thinking in (True, False):
        expected = ref.apply_chat_template(
            TOOL_TURNS, tools=TOOLS, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert tok.apply_chat_template(TOOL_TURNS, tools=TOOLS, enable_thinking=thinking) == expected


def test_list_of_parts_content(tok: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a joke."}]
    messages = [*MESSAGES[:3], {"role": "user", "content": parts}]
    assert tok.apply_chat_template(messages) == EXPECTED_PROMPT.replace("Tell me a joke.", "Tell me\na joke.")
    assert MESSAGES[3]["content"] == "Tell me a joke." and messages[3]["content"] is parts  # not mutated


def test_bad_content_is_a_value_error(tok: Tokenizer) -> None:
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": image}])
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": 42}])
    # An assistant turn that only called tools has no content.
    assert tok.apply_chat_template([{"role": "assistant", "content": None}], add_generation_prompt=False) == (
        "<|begin_of_sentence|>Assistant: <|end_of_sentence|>"
    )


CUSTOM = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ eos_token }}>{% endif %}"
)


def test_template_from_tokenizer_config(tmp_path: Path, demo_dir: Path) -> None:
    d = _copy_tokenizer(demo_dir, tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = CUSTOM
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(d)
    # trim_blocks drops the newline after a block tag, as in HF; tojson keeps Chinese readable.
    assert tok.apply_chat_template(MESSAGES[1:2]) == '[user]"Hi! 你好"\n</s>>'
    # A chat_template.jinja file beside it wins, as in transformers 5.
    (d / "chat_template.jinja").write_text("{{ messages | length }}")
    assert Tokenizer.from_pretrained(d).apply_chat_template(MESSAGES) == "4"


def test_template_list_form_in_config(tmp_path: Path, demo_dir: Path) -> None:
    d = _copy_tokenizer(demo_dir, tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "d"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(d).apply_chat_template(MESSAGES) == "d"


def test_template_from_argument(tmp_path: Path, demo_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(demo_dir, chat_template=CUSTOM)
    assert tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=False) == '[user]"Hi! 你好"\n'
    path = tmp_path / "t.jinja"
    path.write_text("{{ cls_token }}|{{ sep_token }}|{{ bos_token }}")
    assert Tokenizer.from_pretrained(demo_dir, chat_template=str(path)).apply_chat_template(MESSAGES) == (
        "<|begin_of_sentence|>|<|end_of_sentence|>|<s>"
    )
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        Tokenizer.from_pretrained(demo_dir, chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer.from_pretrained(demo_dir, chat_template="{% if %}")


def test_template_raise_exception_and_sandbox(demo_dir: Path) -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}"
    tok = Tokenizer.from_pretrained(demo_dir, chat_template=strict)
    with pytest.raises(ChatTemplateError, match="first turn must be user"):
        tok.apply_chat_template(MESSAGES)
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_pretrained(demo_dir, chat_template=escape).apply_chat_template(MESSAGES)


def test_template_kwargs_reach_the_template(demo_dir: Path) -> None:
    # {% break %} needs the loopcontrols extension, which HF's environment enables.
    tok = Tokenizer.from_pretrained(demo_dir, chat_template="{% for t in tools %}{{ t }}{% break %}{% endfor %}")
    assert tok.apply_chat_template(MESSAGES, tools=["a", "b"]) == "a"


# -- SentencePiece tokenizer.model ----------------------------------------------------------------------

SP_CONTROL = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>"]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("sp-tokenizer")
    model = io.BytesIO()
    # Llama-like: BPE with byte fallback, no normalization; ERNIE's specials are control symbols, which
    # SentencePiece itself never produces from text.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus().splitlines()),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.99,
        control_symbols=SP_CONTROL,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    decoder = {str(i): {"content": t, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>", *SP_CONTROL])}
    decoder["1000"] = {"content": "<|IMAGE_PLACEHOLDER|>", "special": True}  # beyond the model's pieces
    decoder["1001"] = {"content": "<think>", "special": False}
    config = {
        "tokenizer_class": "Ernie4_5_Tokenizer",
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def sp_tok(sp_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(sp_dir)


@pytest.mark.parametrize("text", [t for t in TEXTS if t and not t.startswith(" ")])
def test_sentencepiece_round_trip(sp_tok: Tokenizer, text: str) -> None:
    assert sp_tok.decode(sp_tok.encode(text)) == text


def test_sentencepiece_special_tokens(sp_tok: Tokenizer) -> None:
    assert sp_tok.vocab_size == 1002
    assert (sp_tok.bos_token_id, sp_tok.eos_token_id, sp_tok.pad_token_id) == (1, 2, 0)
    assert sp_tok.stop_token_ids == frozenset({2, 4})
    assert {0, 1, 2, 3, 4, 5, 1000} <= set(sp_tok.all_special_ids) and 1001 not in sp_tok.all_special_ids
    ids = sp_tok.encode(EXPECTED_PROMPT + "ok<|end_of_sentence|><mask:1><|IMAGE_PLACEHOLDER|><think></s>")
    assert ids[0] == 3 and ids[-5:] == [4, 5, 1000, 1001, 2]
    assert sp_tok.encode("hi", add_special_tokens=True) == sp_tok.encode("hi")  # legacy: no BOS
    assert (
        sp_tok.decode(ids)
        == EXPECTED_PROMPT.replace("<|begin_of_sentence|>", "").replace("<|end_of_sentence|>", "") + "ok<think>"
    )
    assert sp_tok.decode(ids, skip_special_tokens=False) == (
        EXPECTED_PROMPT + "ok<|end_of_sentence|><mask:1><|IMAGE_PLACEHOLDER|><think></s>"
    )
    assert sp_tok.apply_chat_template(MESSAGES) == EXPECTED_PROMPT


def test_sentencepiece_out_of_vocab(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("fine")
    assert sp_tok.decode([*ids, 1002, 5000, -1]) == "fine"
    assert sp_tok.convert_ids_to_tokens([1000, 1002, -1]) == ["<|IMAGE_PLACEHOLDER|>", None, None]
    assert sp_tok.decode_token(5000) == ""
    assert sp_tok.decode_token(1) == "<s>"


def test_sentencepiece_byte_fallback_pieces(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("😀")
    assert len(ids) >= 4 and sp_tok.decode(ids[:-1]).endswith("\ufffd") and sp_tok.decode(ids) == "😀"


def test_sentencepiece_without_config(tmp_path: Path, sp_dir: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.stop_token_ids == frozenset({2, 4})
    ids = tok.encode("<unk><s>hi</s><|end_of_sentence|>")
    assert ids[:2] == [0, 1] and ids[-2:] == [2, 4]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<unk><s>hi</s><|end_of_sentence|>"


def test_sentencepiece_missing_package(sp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        Tokenizer.from_pretrained(sp_dir)


# -- token bytes (for grammar backends) -----------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_encoded_text(tok: Tokenizer, padded: Tokenizer, text: str) -> None:
    for tokenizer in (tok, padded):
        table = tokenizer.token_bytes()
        assert len(table) == tokenizer.vocab_size
        assert b"".join(table[i] for i in tokenizer.encode(text)) == text.encode()


def test_token_bytes_of_special_and_placeholder_tokens(tok: Tokenizer, padded: Tokenizer) -> None:
    table = padded.token_bytes()
    assert [table[tok.token_to_id(t)] for t in DEMO_SPECIAL_TOKENS] == [t.encode() for t in DEMO_SPECIAL_TOKENS]
    assert table[DEMO_VOCAB_SIZE] == b"<|placeholder_" + str(DEMO_VOCAB_SIZE).encode() + b"|>"
    assert tok.token_bytes() == table[:DEMO_VOCAB_SIZE]


@pytest.mark.parametrize("text", [t for t in TEXTS if t and not t.startswith(" ")])
def test_sentencepiece_token_bytes(sp_tok: Tokenizer, text: str) -> None:
    table = sp_tok.token_bytes()
    assert len(table) == sp_tok.vocab_size
    # SentencePiece spells the space it puts before the text (its dummy prefix); decoding drops it again
    assert b"".join(table[i] for i in sp_tok.encode(text)) == b" " + text.encode()
    assert table[1000] == b"<|IMAGE_PLACEHOLDER|>" and table[1001] == b"<think>" and table[1] == b"<s>"
