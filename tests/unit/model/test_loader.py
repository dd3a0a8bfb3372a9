"""Checkpoint loading: shards, dtypes, FP8 block quantization, and clear errors for bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.model.config import ModelConfig, ModelConfigError
from moemesh.model.loader import CheckpointError, dequantize_fp8, load_model
from moemesh.model.mla import NoCacheAttention
from moemesh.model.tiny import tiny_config, write_checkpoint
from tests.conftest import SMALL
from tests.fp8_checkpoint import FP8_SMALL, write_fp8_checkpoint

IDS = list(range(20, 53))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention([len(ids)])))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("single"), tiny_config(**SMALL), seed=11, tokenizer=False)


def test_sharded_checkpoint_loads_identically(single: Path, tmp_path: Path) -> None:
    sharded = write_checkpoint(tmp_path, tiny_config(**SMALL), seed=11, shards=3, tokenizer=False)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(load_model(single)), logits(load_model(sharded)))


def test_bf16_checkpoint_auto_dtype(single: Path, tmp_path: Path) -> None:
    bf16 = write_checkpoint(tmp_path, tiny_config(**SMALL, torch_dtype="bfloat16"), seed=11,
                            dtype=torch.bfloat16, tokenizer=False)
    model = load_model(bf16)  # auto: the checkpoint's dtype
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float32
    assert load_model(bf16, "float32").lm_head.weight.dtype == torch.float32
    ref = logits(load_model(single))
    got = logits(model)
    # bf16 weights of the same random draw: close to the fp32 logits, not equal.
    assert 0 < (got - ref).abs().max() < 0.5 * ref.abs().max()


def test_fp8_block_quantized_checkpoint_is_dequantized(tmp_path: Path) -> None:
    path, tensors = write_fp8_checkpoint(tmp_path)
    expected, originals = {}, {}
    for name in tensors:
        if name.endswith("_scale_inv"):
            weight = name.removesuffix("_scale_inv")
            expected[weight] = dequantize_fp8(tensors[weight], tensors[name], (128, 128))
    originals = load_file(str(write_checkpoint(tmp_path / "orig", tiny_config(**FP8_SMALL, torch_dtype="bfloat16"),
                                               seed=5, tokenizer=False) / "model.safetensors"))
    converted = load_model(path, "float32", fp8_experts=False)
    model = load_model(path, "float32")  # the routed experts stay in 8 bits
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.kv_b_proj.weight, expected["model.layers.0.self_attn.kv_b_proj.weight"])
    w13 = converted.model.layers[1].mlp.experts.w13
    inter = w13.shape[1] // 2
    assert torch.equal(w13[3, inter:], expected["model.layers.1.mlp.experts.3.up_proj.weight"])
    experts = model.model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn and experts.w13.element_size() == 1
    up = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert torch.equal(experts.w13[3, inter:], tensors[up]) and torch.equal(experts.w13_scale_inv[3, 1],
                                                                           tensors[up + "_scale_inv"])
    w13_3, w2_3 = experts.fp8().expert(3, torch.float32)  # converted when computed: the same numbers
    assert torch.equal(w13_3, w13[3]) and torch.equal(w2_3, converted.model.layers[1].mlp.experts.w2[3])
    assert torch.equal(logits(model), logits(converted))
    # The dequantized weights are close to the originals (e4m3 keeps a 3-bit mantissa).
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    rel = (attn.o_proj.weight - originals[o_proj].float()).abs().max() / originals[o_proj].float().abs().max()
    assert 0 < rel < 0.07
    assert load_model(path).lm_head.weight.dtype == torch.bfloat16  # auto: config's torch_dtype


def test_dequantize_fp8_block_scales() -> None:
    w = torch.ones(130, 260).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = dequantize_fp8(w, scale, (128, 128))
    assert out[0, 0] == 1 and out[0, 128] == 2 and out[0, 259] == 3 and out[129, 0] == 4 and out[129, 259] == 6


def test_mtp_layers_are_skipped(single: Path, tmp_path: Path) -> None:
    tensors = load_file(str(single / "model.safetensors"))
    n = SMALL["num_hidden_layers"]
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)  # DeepSeek-V3's MTP layer sits past the stack
    out = tmp_path / "mtp"
    out.mkdir()
    (out / "config.json").write_text((single / "config.json").read_text())
    save_file(tensors, str(out / "model.safetensors"))
    assert torch.equal(logits(load_model(out)), logits(load_model(single)))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_and_malformed_folders(single: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_model(empty)
    bad = _copy(single, tmp_path / "badjson")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(bad)
    noweights = _copy(single, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(noweights)
    corrupt = _copy(single, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"not a readable safetensors"):
        load_model(corrupt)


def test_unsupported_architecture_names_the_supported_ones(single: Path, tmp_path: Path) -> None:
    llama = _copy(single, tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM.*DeepseekV3ForCausalLM, DeepseekV2ForCausalLM"):
        load_model(llama)


def test_config_validation() -> None:
    with pytest.raises(ModelConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf_dict(tiny_config(**{**SMALL, "num_experts_per_tok": 9}))
    with pytest.raises(ModelConfigError, match="n_group"):
        ModelConfig.from_hf_dict(tiny_config(**{**SMALL, "n_group": 3}))
    with pytest.raises(ModelConfigError, match="missing or has a malformed field"):
        ModelConfig.from_hf_dict({k: v for k, v in tiny_config().items() if k != "hidden_size"})
    with pytest.raises(ModelConfigError, match="rope type"):
        ModelConfig.from_hf_dict(tiny_config(rope_scaling={"type": "dynamic", "factor": 2.0}))


def test_tensor_mismatches_are_named(single: Path, tmp_path: Path) -> None:
    tensors = load_file(str(single / "model.safetensors"))
    missing = _copy(single, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if "experts.5.up_proj" not in k}, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 2 tensors.*layers.1.mlp.experts.5.up_proj"):
        load_model(missing)
    wrong = _copy(single, tmp_path / "wrong")
    save_file({**tensors, "model.norm.weight": torch.ones(7)}, str(wrong / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(7,\)"):
        load_model(wrong)
    extra = _copy(single, tmp_path / "extra")
    save_file({**tensors, "model.layers.0.mystery.weight": torch.ones(2)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mystery"):
        load_model(extra)
