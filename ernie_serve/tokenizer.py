"""The tokenizer a served model speaks: text <-> token ids, special tokens, and the chat template.

Loaded once per engine (`ResolvedModel.load_tokenizer` in ernie_serve/models.py) from the checkpoint
directory, `--tokenizer`, or built in memory for a preset shape. Two formats are read: `tokenizer.json`
through the `tokenizers` library, or a SentencePiece `tokenizer.model` (what ERNIE 4.5 ships) through
`sentencepiece`, imported only when needed. transformers is never imported here: serving does not depend on it.

`Tokenizer` is the whole interface the rest of ernie-serve (engine, output processing, gateway, offline API)
sees; the file formats hide behind the private `_Codec` protocol, one implementation per format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ernie_serve.core.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RustTokenizer

__all__ = ["ERNIE_CHAT_TEMPLATE", "ERNIE_TOOLS_CHAT_TEMPLATE", "MARKUP_TOKENS", "ChatTemplateError", "Tokenizer"]

# ERNIE 4.5's chat template, verbatim from the model's tokenizer_config.json (REFERENCE.md). Used when a
# checkpoint carries no template of its own.
ERNIE_CHAT_TEMPLATE = r"""{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}
{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}
{%- if not sep_token is defined -%}{%- set sep_token = "<|end_of_sentence|>" -%}{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
  {%- if message["role"] == "user" -%}{{- "User: " + message["content"] + "\n" -}}
  {%- elif message["role"] == "assistant" -%}{{- "Assistant: " + message["content"] + sep_token -}}
  {%- elif message["role"] == "system" -%}{{- message["content"] + "\n" -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "Assistant: " -}}{%- endif -%}"""  # noqa: E501

# ERNIE_CHAT_TEMPLATE plus what ERNIE's Thinking template also renders, in our own wording and ERNIE's tags: the
# request's `tools` as JSON schemas with how to call them, assistant turns' `tool_calls` and `tool` results in the
# history, and `enable_thinking` (a `chat_template_kwargs` key: true opens `<think>`, false gives an empty
# thought). A conversation without them renders exactly as with ERNIE_CHAT_TEMPLATE. The default for checkpoints
# without a template, and the demo tokenizer's.
ERNIE_TOOLS_CHAT_TEMPLATE = r"""{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}
{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}
{%- if not sep_token is defined -%}{%- set sep_token = "<|end_of_sentence|>" -%}{%- endif -%}
{{- cls_token -}}
{%- if tools -%}
  {{- "You can call the tools below, each described by a JSON schema:\n<tool_list>\n" -}}
  {%- for tool in tools -%}{{- tool | tojson -}}{{- "\n" -}}{%- endfor -%}
  {{- "</tool_list>\nTo call tools, answer with one block per call:\n<tool_call>\n" -}}
  {{- "{\"name\": \"the tool's name\", \"arguments\": {\"a parameter\": \"its value\"}}\n</tool_call>\n" -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message["role"] == "user" -%}{{- "User: " + message["content"] + "\n" -}}
  {%- elif message["role"] == "assistant" -%}
    {{- "Assistant: " + message["content"] -}}
    {%- for call in message["tool_calls"] or [] -%}
      {%- set function = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]} -%}
      {{- "<tool_call>\n" + function | tojson + "\n</tool_call>\n" -}}
    {%- endfor -%}
    {{- sep_token -}}
  {%- elif message["role"] == "tool" -%}{{- "User: <tool_response>\n" + message["content"] + "\n</tool_response>\n" -}}
  {%- elif message["role"] == "system" -%}{{- message["content"] + "\n" -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- "Assistant: " -}}
  {%- if enable_thinking is defined -%}{{- "<think>\n" if enable_thinking else "<think>\n\n</think>\n\n" -}}{%- endif -%}
{%- endif -%}"""  # noqa: E501

# The named special-token slots of a HuggingFace tokenizer_config.json, in the order HF lists them.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# ERNIE's conventions, applied to slots tokenizer_config.json does not mention (or when it is absent), and
# only for tokens the vocabulary has: <unk> doubles as pad, <|end_of_sentence|> ends assistant turns.
_ERNIE_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "cls_token": "<|begin_of_sentence|>",
    "sep_token": "<|end_of_sentence|>",
}

# Generation ends at eos and at the end of an assistant turn, whatever the config names as eos.
_STOP_TOKENS = ("</s>", "<|end_of_sentence|>")

# ERNIE's reasoning and tool-call markup (REFERENCE.md). Thinking models have each as one vocabulary token, which
# a tokenizer config may mark special; decoding prints them even when it skips special tokens, as HF does for
# tokens marked `"special": false`: they are part of the model's answer, and the gateway's output parsers
# (gateway/parsers.py) find reasoning and tool calls by them.
MARKUP_TOKENS = ("<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>")


class TokenizerFileError(UserError, FileNotFoundError):
    """`--tokenizer` or `--chat-template` names no usable file."""


class ChatTemplateError(UserError, ValueError):
    """The messages cannot be rendered: bad content, or the template refused them (`raise_exception`).

    A ValueError so the gateway answers 400 with the message."""


class _Codec(Protocol):
    """What `Tokenizer` needs from a tokenizer library; one implementation per file format."""

    id_bound: int  # one past the largest id the codec knows

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def token_to_id(self, token: str) -> int | None: ...

    def special_ids(self) -> set[int]: ...

    def token_bytes(self) -> list[bytes]: ...


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the character that stands for each byte in vocabulary strings.
    Printable bytes stand for themselves; the others take the code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_LEVEL_CHARS = _byte_level_chars()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_LEVEL_CHARS[c] for c in token)
    except KeyError:  # not spelled in the byte alphabet (a token added to the model by hand): its own text
        return token.encode()


def _piece_bytes(piece: str) -> bytes:
    """A SentencePiece-style piece's bytes: "▁" is a space, "<0x0A>" the byte it names."""
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()


class _HFCodec:
    """`tokenizer.json`, run by the `tokenizers` library (Rust, fast; added tokens are split out by it).

    Takes ownership of `tok`: the tokens below are added to it in place."""

    def __init__(self, tok: RustTokenizer, added_tokens: Mapping[int, tuple[str, bool]], extra: Iterable[str]) -> None:
        from tokenizers import AddedToken

        self._tok = tok
        # tokenizer_config.json may declare tokens the tokenizer.json lacks; HF adds them on load, so do we
        # (they get the next free ids, which is what HF does too).
        for content, special in added_tokens.values():
            if self._tok.token_to_id(content) is None:
                self._tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        for content in extra:
            if self._tok.token_to_id(content) is None:
                self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        added_ids = self._tok.get_added_tokens_decoder().keys()
        self.id_bound = max([self._tok.get_vocab_size(with_added_tokens=True) - 1, *added_ids]) + 1

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # `encode_batch` releases the GIL while it works and `encode` does not: a long text encoded by
        # `encode` in a worker thread would still stop the event loop (a 3 MB text: 15 s).
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # The library skips unknown ids itself, but a negative or > 2**32 id raises OverflowError.
        bound = self.id_bound
        return self._tok.decode([i for i in ids if 0 <= i < bound], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if 0 <= token_id < self.id_bound else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        return {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}

    def token_bytes(self) -> list[bytes]:
        added = {i: token.content for i, token in self._tok.get_added_tokens_decoder().items()}
        # Byte-level vocabularies spell bytes with stand-in characters; the others are SentencePiece-like.
        byte_level = '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))
        table = [b""] * self.id_bound
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            table[i] = _byte_level_bytes(token) if byte_level else _piece_bytes(token)
        for i, content in added.items():
            table[i] = content.encode()
        return table


class _SentencePieceCodec:
    """SentencePiece `tokenizer.model`, Llama-style "legacy": text between added tokens is encoded on its own
    (each chunk gets SentencePiece's dummy-prefix space), no BOS unless tokenizer_config.json asks for it."""

    def __init__(
        self,
        path: Path,
        added_tokens: Mapping[int, tuple[str, bool]],
        extra: Iterable[str],
        add_bos: str | None,
        add_eos: str | None,
    ) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(
                f"{path} is a SentencePiece model and the sentencepiece package is not installed: "
                "pip install sentencepiece"
            ) from e
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._num_pieces = self._sp.get_piece_size()
        # Added tokens: content -> id, and which of them are special (skipped by decode).
        self._added: dict[str, int] = {content: i for i, (content, _) in added_tokens.items()}
        self._special: set[int] = {i for i, (_, special) in added_tokens.items() if special}
        # Control pieces (<s>, </s>, ...) and <unk> can never come out of sp.encode as themselves, so their
        # text must be matched before SentencePiece sees it, like the named special tokens (and decode must
        # print or skip them like specials, not as SentencePiece's " ⁇ "). One pass over the vocab at load.
        for i in range(self._num_pieces):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                piece = self._sp.id_to_piece(i)
                self._added.setdefault(piece, i)
                self._special.add(self._added[piece])
        for content in extra:
            if content not in self._added:
                piece_id = self._sp.piece_to_id(content)
                # piece_to_id answers unk for unknown text; only an exact piece is the token itself.
                if self._sp.id_to_piece(piece_id) != content:
                    piece_id = max([self._num_pieces - 1, *self._added.values()]) + 1
                self._added[content] = piece_id
                self._special.add(piece_id)
        self._added_by_id = {i: content for content, i in self._added.items()}
        self.id_bound = max([self._num_pieces - 1, *self._added_by_id]) + 1
        # Longest first, so "<mask:10>" is not cut as "<mask:1>" + "0>".
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")")
        self._bos = self._added.get(add_bos) if add_bos else None
        self._eos = self._added.get(add_eos) if add_eos else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        # re.split with one capture group alternates plain text (even indices) and added tokens (odd).
        for n, chunk in enumerate(self._split.split(text)):
            if n % 2:
                ids.append(self._added[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        if add_special_tokens:
            ids = ([self._bos] if self._bos is not None else []) + ids
            ids += [self._eos] if self._eos is not None else []
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Runs of ordinary pieces go to SentencePiece together (it joins byte-fallback pieces and turns
        # "▁" into spaces); added tokens are emitted as their text, as ERNIE's own tokenizer does.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._added_by_id:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not (skip_special_tokens and i in self._special):
                    out.append(self._added_by_id[i])
            elif 0 <= i < self._num_pieces:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._num_pieces else None

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        piece_id = self._sp.piece_to_id(token)
        return piece_id if self._sp.id_to_piece(piece_id) == token else None

    def special_ids(self) -> set[int]:
        return set(self._special)

    def token_bytes(self) -> list[bytes]:
        table = [_piece_bytes(self._sp.id_to_piece(i)) for i in range(self._num_pieces)]
        table += [b""] * (self.id_bound - self._num_pieces)
        for i, content in self._added_by_id.items():
            table[i] = content.encode()
        return table


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass(frozen=True)
class _TokenizerConfig:
    """What a tokenizer_config.json says that serving uses, read once by `_parse_tokenizer_config`."""

    added: dict[int, tuple[str, bool]]  # added_tokens_decoder: id -> (content, special)
    special: dict[str, str]  # slot name (bos_token, ...) -> token text, ERNIE's defaults filling silent slots
    additional: list[str]  # additional_special_tokens
    extra: list[str]  # every token the config names, added to the vocabulary if missing (as HF does)
    add_bos: str | None  # the token to prepend when encoding with add_special_tokens (add_bos_token)
    add_eos: str | None  # likewise appended (add_eos_token)
    chat_template: str | None


def _parse_tokenizer_config(config: Mapping[str, Any]) -> _TokenizerConfig:
    added: dict[int, tuple[str, bool]] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if content is not None:
            added[int(key)] = (content, bool(entry.get("special", True)))
    configured = {k: _token_content(config[k]) for k in _SPECIAL_TOKEN_KEYS if k in config}
    additional = [t for t in map(_token_content, config.get("additional_special_tokens") or []) if t is not None]
    # Tokens the config names are added to the vocabulary if missing (as HF does); the ERNIE defaults
    # only fill slots the config is silent on, and only where the vocabulary has them.
    extra = [*(t for t in configured.values() if t is not None), *additional]
    special = {k: v for k, v in _ERNIE_SPECIAL_TOKENS.items() if k not in configured}
    special.update({k: v for k, v in configured.items() if v is not None})
    return _TokenizerConfig(
        added=added,
        special=special,
        additional=additional,
        extra=extra,
        add_bos=special.get("bos_token") if config.get("add_bos_token") else None,
        add_eos=special.get("eos_token") if config.get("add_eos_token") else None,
        chat_template=_template_from_config(config.get("chat_template")),
    )


def _template_from_config(value: Any) -> str | None:
    """`chat_template` is a string, or (older HF) a list of {"name", "template"}: "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _template_from_argument(value: str) -> str:
    """An explicit --chat-template: a Jinja string, or the path of a file holding one."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise TokenizerFileError(f"chat template {value!r} is neither an existing file nor a Jinja template")
    return path.read_text(encoding="utf-8")


def _choose_template(argument: str | None, parsed: _TokenizerConfig) -> str:
    """The template to use: the caller's (--chat-template or a chat_template.jinja file), else the config's,
    else ERNIE's (with tools)."""
    if argument is not None:
        return _template_from_argument(argument)
    return parsed.chat_template or ERNIE_TOOLS_CHAT_TEMPLATE


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF's filter: unlike Jinja's built-in it keeps non-ASCII text readable (tool schemas in Chinese).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """Compile once at load, with HF's environment (sandboxed: templates come from downloaded checkpoints)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def _flatten_content(content: Any) -> Any:
    """OpenAI lets content be a list of parts; templates expect one string. Text parts are joined with
    newlines, as vLLM does; other part types have nothing to render them with in a text-only model."""
    if content is None:
        return ""  # an assistant turn that only called tools
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(f"unsupported message content part {kind!r}: only text parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


class Tokenizer:
    """Text <-> ids for one model, built once at engine start; immutable afterwards, so any thread may read it.

    The public surface, and who calls it:
    - built by `from_pretrained(path)` (a checkpoint or `--tokenizer` directory) or `from_tokenizers(...)` (an
      in-memory `tokenizers` object, e.g. the placeholder-padded demo tokenizer of a preset shape);
    - per request: `encode` (prompts), `apply_chat_template` (chat requests), `decode` (the incremental
      detokenizer's windows, echoed prompts), `decode_token` (logprobs' `decoded_token`);
    - once at start: `stop_token_ids` (what ends generation), `vocab_size` (the id bound, checked against the
      model's embedding), `eos_token_id` / `bos_token_id`;
    - for users of `LLM.get_tokenizer()`, with HF's names and meanings: `len()`, `pad_token_id`,
      `all_special_ids`, `token_to_id`, `convert_ids_to_tokens`, `chat_template`.
    Nothing else is public.
    """

    def __init__(
        self,
        codec: _Codec,
        special_tokens: Mapping[str, str],
        additional_special_tokens: Sequence[str],
        chat_template: str,
    ) -> None:
        """Private to the constructors below: `codec` runs one file format, `special_tokens` maps slot names
        to token text, `chat_template` is Jinja source."""
        self._codec = codec
        # Slot name -> token text, only for tokens the vocabulary has; what templates see as `bos_token`, ...
        self._special_tokens: dict[str, str] = {
            k: v for k, v in special_tokens.items() if codec.token_to_id(v) is not None
        }
        self.chat_template = chat_template
        self._template = _compile_template(chat_template)
        named = [*self._special_tokens.values(), *additional_special_tokens]
        ids = {codec.token_to_id(t) for t in named} | codec.special_ids()
        self._all_special_ids = sorted(i for i in ids if i is not None)
        stop = {codec.token_to_id(t) for t in (self._special_tokens.get("eos_token"), *_STOP_TOKENS) if t}
        self._stop_token_ids = frozenset(i for i in stop if i is not None)
        self._markup_ids = frozenset(i for i in map(codec.token_to_id, MARKUP_TOKENS) if i in codec.special_ids())

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load the tokenizer in a checkpoint directory; called once when the engine starts.

        `chat_template` (a Jinja string or a file path) overrides the checkpoint's template (a
        chat_template.jinja file, else tokenizer_config.json's); without any, ERNIE's template is used.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerFileError(f"tokenizer directory {str(directory)!r} does not exist")
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        parsed = _parse_tokenizer_config(config)

        codec: _Codec
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as RustTokenizer

            rust = RustTokenizer.from_file(str(directory / "tokenizer.json"))
            codec = _HFCodec(rust, parsed.added, parsed.extra)
        elif (directory / "tokenizer.model").is_file():
            codec = _SentencePieceCodec(
                directory / "tokenizer.model", parsed.added, parsed.extra, parsed.add_bos, parsed.add_eos
            )
        else:
            raise TokenizerFileError(f"no tokenizer in {str(directory)!r}: expected tokenizer.json or tokenizer.model")

        template_file = directory / "chat_template.jinja"
        if chat_template is None and template_file.is_file():  # transformers 5's place for it wins over the config
            chat_template = template_file.read_text(encoding="utf-8")
        return cls(codec, parsed.special, parsed.additional, _choose_template(chat_template, parsed))

    @classmethod
    def from_tokenizers(
        cls, tokenizer: RustTokenizer, config: Mapping[str, Any], chat_template: str | None = None
    ) -> Tokenizer:
        """A tokenizer built in memory: `tokenizer` is what tokenizer.json would hold (a `tokenizers.Tokenizer`,
        owned by the result from now on) and `config` what tokenizer_config.json would say. Gives the same
        tokenizer as `from_pretrained` on a directory holding those two files, without writing one; used for
        preset shapes, whose tokenizer exists nowhere on disk.
        """
        parsed = _parse_tokenizer_config(config)
        codec = _HFCodec(tokenizer, parsed.added, parsed.extra)
        return cls(codec, parsed.special, parsed.additional, _choose_template(chat_template, parsed))

    # -- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One past the largest token id, added tokens included (the model's embedding may be larger)."""
        return self._codec.id_bound

    def __len__(self) -> int:
        """`vocab_size`, as HF's `len(tokenizer)`."""
        return self._codec.id_bound

    def _special_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return self._codec.token_to_id(token) if token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        """The configured eos token's id (ERNIE: `</s>` = 2); None when the vocabulary lacks it."""
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        """The configured bos token's id (ERNIE: `<s>` = 1), which ERNIE never adds to prompts itself."""
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        """The configured pad token's id (ERNIE: `<unk>` = 0)."""
        return self._special_id("pad_token")

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation unless `ignore_eos`: eos, `</s>` and `<|end_of_sentence|>` when present."""
        return self._stop_token_ids

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of every special token (named slots, additional and added-as-special tokens)."""
        return list(self._all_special_ids)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string (special tokens included); None when it is not one token."""
        return self._codec.token_to_id(token)

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes as generation emits them (special and added tokens: their text), indexed by id, for
        grammar backends, which match tokens against bytes; called once per engine by the first structured-output
        request. Concatenating the bytes of `encode(text)` gives back `text`."""
        return self._codec.token_bytes()

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Vocabulary strings (e.g. byte-level "Ġthe"), None for ids the tokenizer does not have."""
        return [self._codec.id_to_token(int(i)) for i in ids]

    # -- text ---------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. Called once per prompt."""
        return self._codec.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids the tokenizer does not have (checkpoints pad the embedding past the vocabulary,
        so a sampler can pick them) decode to nothing rather than failing. `MARKUP_TOKENS` are never skipped."""
        ids = [int(i) for i in ids]
        if not skip_special_tokens or self._markup_ids.isdisjoint(ids):
            return self._codec.decode(ids, skip_special_tokens)
        # The runs between markup tokens decode as usual; markup tokens are whole characters, so the pieces
        # join into the same text a tokenizer that does not skip them would give.
        pieces, start = [], 0
        for k, token in enumerate(ids):
            if token in self._markup_ids:
                pieces += [self._codec.decode(ids[start:k], True), self._codec.decode([token], False)]
                start = k + 1
        pieces.append(self._codec.decode(ids[start:], True))
        return "".join(pieces)

    def decode_token(self, token_id: int) -> str:
        """One token's text, special tokens included, for logprobs' `decoded_token`; "" when unknown."""
        return self._codec.decode([int(token_id)], False)

    # -- chat ---------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], /, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a chat request's messages into the prompt text; called once per chat request.

        `kwargs` reach the template as variables (e.g. `tools`, a request's `chat_template_kwargs`), after the
        special tokens (`bos_token`, `cls_token`, ...), as HF passes them; any string may be a key (the
        parameters before `/` cannot clash), and one that clashes with `messages` is a `ChatTemplateError`.
        """
        flat = [{**m, "content": _flatten_content(m.get("content"))} for m in messages]
        variables = {**self._special_tokens, **kwargs}
        try:
            return self._template.render(messages=flat, add_generation_prompt=add_generation_prompt, **variables)
        except (jinja2.TemplateError, TypeError) as e:
            # TypeError: the template concatenated a non-string the client sent (e.g. numeric content).
            raise ChatTemplateError(f"cannot render chat template: {e}") from e
