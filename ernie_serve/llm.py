"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ernie_serve.core.config import EngineSettings
from ernie_serve.core.request import RequestOutput
from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.engine import Engine
from ernie_serve.structured_output import CompiledGrammar
from ernie_serve.tokenizer import Tokenizer

PromptInput = str | dict[str, Any]  # text, or {"prompt_token_ids": [...]} (optionally with "prompt")
Conversation = list[dict[str, Any]]


class LLM:
    """One engine, used synchronously. Every request of one `generate`/`chat` call is batched together.

    Keywords are `EngineSettings` fields, or options of the chosen backend (e.g. `cpu_weight_prepack=False`
    for torch), which go to `EngineSettings.backend_options`. Call `close()` (or use `with LLM(...) as llm:`)
    to release the backend when done."""

    def __init__(
        self,
        model: str = "demo",
        backend: str = "torch",
        dtype: str = "auto",
        scheduler: str = "fcfs",
        load_format: str = "auto",
        **settings: Any,
    ) -> None:
        engine_fields = set(EngineSettings.model_fields)
        backend_options = {k: settings.pop(k) for k in list(settings) if k not in engine_fields}
        if backend_options:
            settings["backend_options"] = {**settings.get("backend_options", {}), **backend_options}
        self.engine = Engine(
            EngineSettings(
                model=model,
                backend=backend,
                dtype=dtype,
                scheduler=scheduler,
                load_format=load_format,
                **settings,
            )
        )

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = Engine(settings)
        return llm

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (`Engine.reset_prefix_cache`): the next prompts are computed whole, as on a
        fresh LLM. True once done (`generate` returns with nothing left running)."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Release the backend (threads, memory, devices); the LLM cannot generate afterwards."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt at once; outputs come back in input order. A `structured_outputs` spec that
        does not compile raises its `SamplingParamsError` before any request starts."""
        prompt_list = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params_list = self._align(prompt_list, sampling_params)
        grammars = self._compile_grammars(params_list)
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                text, token_ids = self._tokenize(prompt)
                grammar = grammars.get(params.structured_outputs.key) if params.structured_outputs else None
                rank = priority[i] if priority else 0
                ids.append(self.engine.add_request(token_ids, params, prompt=text, priority=rank, grammar=grammar))
        except Exception:
            self.engine.abort_request(ids)
            self._drain()
            raise
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    results[output.request_id] = output
        self._drain()
        return [results[i] for i in ids]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then `generate`. As vLLM's: `tools`
        (OpenAI tool definitions) and `chat_template_kwargs` (e.g. `{"enable_thinking": False}`) reach the
        template; the text comes back as the model wrote it (the gateway's parsers are not applied)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        variables = {**(chat_template_kwargs or {}), **({"tools": tools} if tools else {})}
        prompts = [self.render_chat(c, add_generation_prompt, **variables) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def render_chat(
        self, conversation: Conversation, add_generation_prompt: bool = True, **template_variables: Any
    ) -> dict[str, Any]:
        text = self.engine.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, **template_variables
        )
        # the template already places the special tokens: encode without adding any
        return {"prompt": text, "prompt_token_ids": self.engine.tokenizer.encode(text)}

    def stream(self, prompt: str, sampling_params: SamplingParams | None = None, chat: bool = False) -> Iterator[str]:
        """Yield text deltas of one request as they are produced (the CLI's `generate`). The deltas add up to
        the final text exactly: text that may still turn out to be part of a stop string is held back."""
        source: PromptInput = self.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
        text, token_ids = self._tokenize(source)
        request_id = self.engine.add_request(token_ids, sampling_params, prompt=text)
        shown = 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    full = output.outputs[0].text
                    if len(full) > shown:
                        yield full[shown:]
                        shown = len(full)
        finally:
            self.engine.abort_request(request_id)
            self._drain()

    def _compile_grammars(self, params_list: list[SamplingParams]) -> dict[tuple[str, str], CompiledGrammar]:
        """The call's distinct structured-output specs, compiled at once on worker threads (llguidance lets go of
        the GIL while it compiles)."""
        specs = {p.structured_outputs.key: p.structured_outputs for p in params_list if p.structured_outputs}
        if not specs:
            return {}
        with ThreadPoolExecutor(max_workers=min(len(specs), os.cpu_count() or 1)) as pool:
            return dict(zip(specs, pool.map(self.engine.structured_outputs.compile, specs.values()), strict=True))

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], self.engine.tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")

    @staticmethod
    def _align(
        prompts: list[PromptInput], params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in prompts]
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        return params

    def _drain(self) -> None:
        """Step until aborted requests are flushed, so the next call starts clean."""
        while self.engine.has_unfinished_requests():
            self.engine.step()
