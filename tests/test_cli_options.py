"""Backend option flags generated from every registered backend's `options_class`, collected into
`EngineSettings.backend_options` when given, checked against the selected backend, and flag clashes."""

from __future__ import annotations

import argparse

import pytest
from pydantic import Field

from ernie_serve.backends.torch.backend import TorchBackend, TorchOptions
from ernie_serve.cli_options import (
    FlagClashError,
    add_backend_arguments,
    add_settings_arguments,
    backend_option_errors,
    given_backend_options,
    given_settings,
)
from ernie_serve.core.backend import Backend, BackendOptions
from ernie_serve.core.config import EngineSettings

ENGINE = {"engine option": EngineSettings}


class CacheOptions(BackendOptions):
    cache_dir: str | None = Field(None, description="where the engine cache lives")
    fast: bool = Field(False, description="go fast")


class OtherCacheOptions(BackendOptions):
    cache_dir: str | None = None


def _backend(name: str, options: type[BackendOptions]) -> type[Backend]:
    return type(f"{name.title()}Backend", (TorchBackend,), {"name": name, "options_class": options})


FAKE_BACKENDS = {"torch": TorchBackend, "cached": _backend("cached", CacheOptions)}


def _parser(backends=FAKE_BACKENDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-serve generate")
    add_settings_arguments(parser, EngineSettings)
    add_backend_arguments(parser, ENGINE, backends)
    return parser


def test_every_registered_backend_option_is_a_flag_in_its_own_group() -> None:
    parser = argparse.ArgumentParser(prog="ernie-serve serve")
    add_settings_arguments(parser, EngineSettings)
    add_backend_arguments(parser, ENGINE)  # the real registry: torch and onnx
    help_text = parser.format_help()
    assert "torch backend options:\n  --cpu-weight-prepack, --no-cpu-weight-prepack" in help_text
    flat = " ".join(help_text.split())  # argparse wraps help to the terminal's width
    assert "(default: True; env ERNIE_SERVE_CPU_WEIGHT_PREPACK)" in flat
    assert "onnx backend options:\n  --onnx-providers ONNX_PROVIDERS" in help_text
    assert "--backend-options" not in help_text  # the dict field has no flag of its own


def test_only_given_options_are_collected_into_engine_settings(monkeypatch) -> None:
    monkeypatch.setenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", "false")  # read by TorchOptions, not collected here
    parser = _parser()
    assert given_backend_options(parser.parse_args([]), FAKE_BACKENDS) == {}
    args = parser.parse_args(["--no-cpu-weight-prepack", "--cache-dir", "/tmp/c", "--max-num-seqs", "3"])
    assert given_backend_options(args, FAKE_BACKENDS) == {"cpu_weight_prepack": False, "cache_dir": "/tmp/c"}

    real = argparse.ArgumentParser()
    add_settings_arguments(real, EngineSettings)
    add_backend_arguments(real, ENGINE)
    args = real.parse_args(["--onnx-providers", "cuda,cpu", "--onnx-providers", "trt", "--max-num-seqs", "3"])
    given = given_settings(args, EngineSettings)
    assert given == {"max_num_seqs": "3", "backend_options": {"onnx_providers": ["cuda,cpu", "trt"]}}
    settings = EngineSettings(**given_settings(real.parse_args([]), EngineSettings))
    assert settings.backend_options == {}
    assert TorchOptions(**settings.backend_options).cpu_weight_prepack is False  # from the environment


def test_an_option_of_another_backend_is_named(monkeypatch) -> None:
    monkeypatch.delenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", raising=False)
    assert backend_option_errors("torch", {"cache_dir": "/x"}, FAKE_BACKENDS) == [
        "ernie-serve: error: --cache-dir is an option of backend 'cached', not of 'torch'"
    ]
    assert backend_option_errors("cached", {"cache_dir": "/x", "fast": "yes"}, FAKE_BACKENDS) == []
    assert backend_option_errors("no-such-backend", {"cache_dir": "/x"}, FAKE_BACKENDS) == []  # reported later


def test_bad_values_name_the_flag_or_the_env_var(monkeypatch) -> None:
    monkeypatch.delenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", raising=False)
    assert backend_option_errors("torch", {"cpu_weight_prepack": "maybe"}, FAKE_BACKENDS) == [
        "ernie-serve: error: --cpu-weight-prepack: Input should be a valid boolean, unable to interpret input"
    ]
    monkeypatch.setenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", "maybe")
    assert backend_option_errors("torch", {}, FAKE_BACKENDS) == [
        "ernie-serve: error: ERNIE_SERVE_CPU_WEIGHT_PREPACK (--cpu-weight-prepack): Input should be a valid "
        "boolean, unable to interpret input"
    ]


def test_two_backends_declaring_one_flag_is_an_error_naming_both() -> None:
    backends = {**FAKE_BACKENDS, "other": _backend("other", OtherCacheOptions)}
    with pytest.raises(FlagClashError) as clash:
        _parser(backends)
    message = str(clash.value)
    assert message.startswith("flag --cache-dir is declared twice: by an option of backend 'cached' (")
    assert "CacheOptions) and by an option of backend 'other' (" in message and "OtherCacheOptions)" in message


def test_a_backend_option_named_like_an_engine_option_is_an_error() -> None:
    class Greedy(BackendOptions):
        max_num_seqs: int = 4

    with pytest.raises(FlagClashError, match="--max-num-seqs is declared twice: by the engine option --max-num-seqs"):
        _parser({"greedy": _backend("greedy", Greedy)})


def test_a_boolean_option_clashes_through_its_negative_flag() -> None:
    class Prefix(BackendOptions):
        no_enable_prefix_caching: str = "x"

    with pytest.raises(FlagClashError, match="--no-enable-prefix-caching is declared twice: by the engine option"):
        _parser({"odd": _backend("odd", Prefix)})


def test_a_clash_with_a_flag_of_the_command_itself_names_the_command() -> None:
    class Sampling(BackendOptions):
        top_k: int = 1

    parser = argparse.ArgumentParser(prog="ernie-serve generate")
    parser.add_argument("--top-k", type=int)
    with pytest.raises(FlagClashError, match=r"backend 'sampler' .* clashes with a flag of `ernie-serve generate`"):
        add_backend_arguments(parser, ENGINE, {"sampler": _backend("sampler", Sampling)})


def test_backends_sharing_an_options_class_share_its_flags() -> None:
    backends = {**FAKE_BACKENDS, "torch-variant": _backend("torch-variant", TorchOptions)}
    args = _parser(backends).parse_args(["--cpu-weight-prepack"])
    assert given_backend_options(args, backends) == {"cpu_weight_prepack": True}
    assert backend_option_errors("torch-variant", {"cpu_weight_prepack": True}, backends) == []
