"""ModelConfig parsing of real-format config.json files, and the presets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ernie_serve.core.config import ModelConfigError
from ernie_serve.models import PRESETS, model_config_from_dict, num_parameters

MOE_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "vocab_size": 103424,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "use_bias": False,
    "tie_word_embeddings": True,
    "rope_theta": 500000,
    "moe_intermediate_size": 1536,
    "moe_k": 6,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": -1,
    "moe_layer_interval": 1,
    "moe_capacity": [64, 64, 64],
    "moe_gate": "topk",
    "moe_use_aux_free": True,
    "use_rmsnorm": True,
    "num_nextn_predict_layers": 1,
}


def test_real_21b_config_parses_with_extra_fields() -> None:
    config = model_config_from_dict(MOE_21B)
    assert config.head_dim == 128  # derived: 2560 / 20
    assert config.extra["moe_gate"] == "topk" and config.extra["num_nextn_predict_layers"] == 1
    assert not config.is_moe_layer(0) and config.is_moe_layer(1) and config.is_moe_layer(27)
    assert config == replace(PRESETS["ernie-4.5-21b-a3b"], moe_layer_end_index=-1)


def test_rope_parameters_and_explicit_head_dim() -> None:
    raw = {**MOE_21B, "head_dim": 96, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    del raw["rope_theta"]
    config = model_config_from_dict(raw)
    assert config.head_dim == 96 and config.rope_theta == 10000.0


def test_moe_layer_selection_interval_and_end() -> None:
    config = model_config_from_dict(
        {
            **MOE_21B,
            "num_hidden_layers": 6,
            "moe_layer_interval": 2,
            "moe_layer_start_index": 0,
            "moe_layer_end_index": 4,
        }
    )
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, False]


def test_unknown_model_type_and_missing_field() -> None:
    with pytest.raises(ModelConfigError, match="unsupported model_type 'qwen2'"):
        model_config_from_dict({**MOE_21B, "model_type": "qwen2"})
    broken = dict(MOE_21B)
    del broken["hidden_size"]
    with pytest.raises(ModelConfigError, match="'hidden_size'"):
        model_config_from_dict(broken)


def test_presets_have_the_published_sizes() -> None:
    sizes = {name: num_parameters(config) / 1e9 for name, config in PRESETS.items()}
    assert sizes["ernie-4.5-0.3b"] == pytest.approx(0.36, abs=0.01)
    assert sizes["ernie-4.5-21b-a3b"] == pytest.approx(21.8, abs=0.1)
    assert sizes["ernie-4.5-300b-a47b"] == pytest.approx(300, abs=1)
    assert not PRESETS["ernie-4.5-300b-a47b"].is_moe_layer(2) and PRESETS["ernie-4.5-300b-a47b"].is_moe_layer(3)


def test_engine_settings_carry_backend_options_but_declare_none(monkeypatch) -> None:
    """Backend options live on each backend's options class; EngineSettings only carries what the user gave."""
    from ernie_serve.core.config import EngineSettings

    monkeypatch.setenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", "false")  # not an engine setting: ignored here
    settings = EngineSettings()
    assert settings.backend_options == {}
    assert not {"cpu_weight_prepack", "onnx_providers"} & set(EngineSettings.model_fields)
    given = EngineSettings(backend_options={"onnx_providers": "cpu"}, quantization="wint8", tensor_parallel_size=2)
    assert given.backend_options == {"onnx_providers": "cpu"}
    assert (given.quantization, given.tensor_parallel_size) == ("wint8", 2)  # the engine checks capabilities
