"""The torch backend's declared capabilities, its own options, and how it reads a lone request's context."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.backends.torch.backend import TorchBackend, TorchOptions
from ernie_serve.backends.torch.model import _onednn_linear_available
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.plan import ScheduledRequest, StepPlan
from ernie_serve.models import read_model_config


def test_capabilities_and_options_are_declared_on_the_class() -> None:
    capabilities = TorchBackend.capabilities
    assert capabilities.prefix_caching and capabilities.devices == ("cpu", "cuda")
    assert capabilities.quantization == ("wint8", "wint4") and capabilities.tensor_parallel
    assert TorchBackend.options_class is TorchOptions
    fields = {
        "cpu_weight_prepack",
        "int8_activations",
        "exact_quantized_kernels",
        "cpu_quantized_kernels",
        "quantize_lm_head",
        "cpu_malloc_trim_interval",
        "enable_expert_parallel",
    }
    assert set(TorchOptions.model_fields) == fields


@pytest.mark.skipif(not _onednn_linear_available(), reason="this torch has no oneDNN linear kernels")
@pytest.mark.parametrize("prepack", [True, False])
def test_cpu_weight_prepack_option_decides_the_onednn_copies(tiny_checkpoint, prepack: bool) -> None:
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    backend = TorchBackend()
    settings = EngineSettings(model=str(checkpoint), device="cpu")
    backend.load(read_model_config(checkpoint), settings, str(checkpoint), TorchOptions(cpu_weight_prepack=prepack))
    assert backend.model is not None
    assert (backend.model.lm_head_packed is not None) == prepack
    backend.close()


def test_the_option_is_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", "0")
    assert TorchOptions().cpu_weight_prepack is False
    assert TorchOptions(cpu_weight_prepack=True).cpu_weight_prepack is True  # a given value beats the env


def test_plugins_listing_shows_how_the_model_is_split() -> None:
    import io

    from ernie_serve.core.plugins import registry
    from ernie_serve.plugin_report import write_report

    out = io.StringIO()
    write_report(registry(), out)
    for line in TorchBackend.parallel_layout():
        assert line in out.getvalue()
    assert "torchrun" in TorchBackend.parallel_layout()[0] and "--enable-expert-parallel" in out.getvalue()


def _backend_counting_gathers(checkpoint, monkeypatch, num_blocks: int) -> tuple[TorchBackend, list[int]]:
    """A loaded backend with blocks of 4 tokens, and a list that grows by one each time attention gathers a
    layer's cache blocks (`gather_blocks`, keys and values together) instead of reading them in place."""
    from ernie_serve.backends.torch import model as torch_model

    backend = TorchBackend()
    settings = EngineSettings(model=str(checkpoint), device="cpu", block_size=4)
    backend.load(read_model_config(checkpoint), settings, str(checkpoint), TorchOptions())
    backend.allocate_kv_cache(num_blocks, 4)
    gathers: list[int] = []
    gather_blocks = torch_model.gather_blocks
    monkeypatch.setattr(torch_model, "gather_blocks", lambda *args: gathers.append(1) or gather_blocks(*args))
    return backend, gathers


@pytest.mark.parametrize("shape", ["moe_shared_tied", "moe_interval2_untied_mqa"])
def test_a_lone_decode_reads_consecutive_blocks_in_place_and_scattered_ones_gathered(
    tiny_checkpoint, monkeypatch, shape
) -> None:
    """A single decoding request whose blocks lie one after another in the pool attends over its slots in place
    (no copy of its blocks); scattered, or out of order, its blocks are gathered first. Same logits either way,
    for every decode step, across a block boundary."""
    backend, gathers = _backend_counting_gathers(tiny_checkpoint(shape, torch.float32), monkeypatch, 64)
    prompt = [5, 17, 9, 30, 41, 8, 12, 3, 60]  # 9 tokens: blocks 0..2, the last one partly filled

    def decode_logits(request_id: str, blocks: list[int], later_block: int) -> list[torch.Tensor]:
        backend.execute(StepPlan([ScheduledRequest(request_id, prompt, 0, blocks, is_new=True, samples=True)]))
        gathers.clear()
        logits = []
        for position, token in zip(range(9, 14), [7, 21, 33, 2, 50], strict=True):
            new_blocks = [later_block] if position == 12 else []  # the fourth block, from position 12
            step = StepPlan([ScheduledRequest(request_id, [token], position, new_blocks, is_new=False, samples=True)])
            logits.append(backend.execute(step))
        backend.release([request_id])
        return logits

    consecutive = decode_logits("in-place", [20, 21, 22], 23)
    assert not gathers
    scattered = decode_logits("gathered", [40, 31, 35], 30)
    assert gathers
    for a, b in zip(consecutive, scattered, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    backend.close()


def test_decodes_of_very_different_lengths_attend_in_groups_as_each_would_alone(tiny_checkpoint, monkeypatch) -> None:
    """On CPU a batch of decoding requests attends in groups of similar context length (little padding each);
    each request's logits are what it gets decoding alone, with or without a prompt computed in the same step.
    Contexts of 90, 3, 40, 5 and 37 tokens, in that row order (the groups' rows are not consecutive): the short
    ones would otherwise be padded to 90."""
    backend, gathers = _backend_counting_gathers(tiny_checkpoint("moe_shared_tied", torch.float32), monkeypatch, 128)
    prompts = {f"r{n}": [(7 * n + 3 * i) % 200 + 5 for i in range(n)] for n in (89, 2, 39, 4, 36, 13)}
    tables, next_block = {}, 0
    for rid, prompt in prompts.items():  # blocks for the prompt and the decoded token, scattered in the pool
        count = -(-(len(prompt) + 1) // 4)
        tables[rid] = [(next_block + j) * 5 % 128 for j in range(count)]
        next_block += count
    decoding, prompt_in_step = list(prompts)[:5], "r13"

    def prefill(rid: str) -> ScheduledRequest:
        return ScheduledRequest(rid, prompts[rid], 0, tables[rid], is_new=True, samples=True)

    def decode(rid: str) -> ScheduledRequest:
        return ScheduledRequest(rid, [11], len(prompts[rid]), [], is_new=False, samples=True)

    alone = {}
    for rid in decoding:
        backend.execute(StepPlan([prefill(rid)]))
        alone[rid] = backend.execute(StepPlan([decode(rid)]))[0]
        backend.release([rid])
    alone[prompt_in_step] = backend.execute(StepPlan([prefill(prompt_in_step)]))[0]
    backend.release([prompt_in_step])

    for rid in decoding:
        backend.execute(StepPlan([prefill(rid)]))
    gathers.clear()
    together = backend.execute(StepPlan([decode(rid) for rid in decoding]))  # [5, V]
    assert len(gathers) > 2 * len(backend.model.layers)  # (K and V) more than one group a layer
    for row, rid in enumerate(decoding):
        torch.testing.assert_close(together[row], alone[rid], rtol=0, atol=1e-5)
    backend.release(decoding)

    for rid in decoding:
        backend.execute(StepPlan([prefill(rid)]))
    order = [*decoding[:2], prompt_in_step, *decoding[2:]]  # a prompt's rows between the decodes'
    mixed = backend.execute(StepPlan([prefill(rid) if rid == prompt_in_step else decode(rid) for rid in order]))
    for row, rid in enumerate(order):
        torch.testing.assert_close(mixed[row], alone[rid], rtol=0, atol=1e-5)
    backend.close()
