"""The up-front check of a `--model` folder (`moemesh.model.config_check`): every config.json field of the
wrong type named with its value, nothing a traceback; a good config passes as ModelConfig reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from moemesh.model.config import ModelConfig, ModelConfigError
from moemesh.model.config_check import check_config_dict, check_model_dir
from moemesh.model.tiny import tiny_config


def _valid() -> dict[str, Any]:
    """The embedded tiny model's config.json."""
    return tiny_config()


def test_a_valid_config_reads_as_model_config_does() -> None:
    assert check_config_dict(_valid()) == ModelConfig.from_hf_dict(_valid())


@pytest.mark.parametrize(("fields", "message"), [
    ({"hidden_size": "abc"}, "hidden_size must be an integer, got 'abc'"),
    ({"hidden_size": None}, "hidden_size must be an integer, got None"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    ({"n_routed_experts": "16"}, "n_routed_experts must be an integer, got '16'"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be a number, got 'small'"),
    ({"scoring_func": 3}, "scoring_func must be a string, got 3"),
    ({"norm_topk_prob": "false"}, "norm_topk_prob must be a boolean, got 'false'"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object, got 'yarn'"),
    ({"rope_scaling": {"type": "yarn", "factor": "4"}}, "rope_scaling.factor must be a number, got '4'"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id[1] must be an integer, got '2'"),
    ({"quantization_config": {"weight_block_size": [128]}},
     "quantization_config.weight_block_size must be two positive integers, got [128]"),
    ({"vocab_size": -1}, "vocab_size must be positive, got -1"),
])
def test_a_bad_field_is_named_with_its_value(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelConfigError) as e:
        check_config_dict({**_valid(), **fields}, "m/config.json")
    assert str(e.value) == f"m/config.json: {message}"


def test_a_missing_field_and_an_unsupported_model_keep_model_configs_words() -> None:
    raw = _valid()
    del raw["hidden_size"]
    with pytest.raises(ModelConfigError, match=r"^m/config\.json is missing or has a malformed field: 'hidden_size'$"):
        check_config_dict(raw, "m/config.json")
    with pytest.raises(ModelConfigError, match=r"unsupported architecture.*DeepseekV3ForCausalLM"):
        check_config_dict({**_valid(), "model_type": "llama"})


def test_nulls_the_parser_defaults_pass() -> None:
    raw = {**_valid(), "moe_intermediate_size": 32, "first_k_dense_replace": None, "routed_scaling_factor": None,
           "q_lora_rank": None, "rope_scaling": None, "quantization_config": None}
    assert check_config_dict(raw).q_lora_rank is None


def test_the_folder_is_checked_first(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=f"^model folder {re.escape(str(tmp_path / 'nope'))} does not exist$"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelConfigError, match="is not a folder"):
        check_model_dir(tmp_path / "file")
    with pytest.raises(ModelConfigError, match=r"config\.json not found"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="is not valid JSON"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_valid()))
    assert check_model_dir(tmp_path) == tmp_path.absolute()


def test_every_reader_of_a_folder_gets_the_field_named(tmp_path: Path) -> None:
    """Workers and benchmarks read config.json through ModelConfig.from_dir: a bad field is named there too."""
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "hidden_size": "abc"}))
    with pytest.raises(ModelConfigError, match="hidden_size must be an integer, got 'abc'"):
        ModelConfig.from_dir(tmp_path)
