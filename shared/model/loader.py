"""Loading a Hugging Face DeepSeek-V2/V3 checkpoint folder into `DeepseekForCausalLM`.

Handles single-file and sharded safetensors (`model.safetensors.index.json`), bf16/fp16/fp32 tensors,
and FP8 block-quantized weights (`weight_scale_inv`, as DeepSeek-V3 ships) dequantized at load.

A process that serves only some routed experts (an expert-parallel rank) says which (`experts`): each MoE layer
then holds just those, in the order given, and the other experts' tensors are never read (safetensors maps the
files, so their bytes are not even paged in): a rank's memory is its share of the experts plus the dense weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from moemesh.model.config import ModelConfig, ModelConfigError
from moemesh.model.deepseek import DeepseekForCausalLM
from moemesh.model.fp8 import FP8_DTYPES, dequantize_blocks
from moemesh.model.moe import MoE, RoutedExperts
from moemesh.model.rope import RotaryEmbedding
from moemesh.model.safetensors_file import SafetensorsFile
from moemesh.model.weights import checkpoint_shapes, expert_of, layer_of, target_of

# The routed experts a process holds: MoE layer index (0-based among MoE layers) -> the logical expert of each of
# its local slots, in slot order (an expert may appear more than once: redundant replicas).
ExpertSelection = Callable[[int], Sequence[int]]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FP8 = FP8_DTYPES
_SCALE_SUFFIX = "_scale_inv"


class CheckpointError(ValueError):
    """The checkpoint folder is missing, unreadable, or does not match its config."""


def resolve_dtype(cfg: ModelConfig, dtype: str) -> torch.dtype:
    """`auto` is the checkpoint's own dtype (FP8 checkpoints compute in their `torch_dtype`, bf16)."""
    name = cfg.torch_dtype.replace("torch.", "") if dtype == "auto" else dtype
    if name not in DTYPES:
        if dtype == "auto":
            return torch.bfloat16
        raise CheckpointError(f"dtype {dtype!r} is not supported (auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing[:5])}")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with SafetensorsFile(f) as fh:
                out.update((k, f) for k in fh.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return out


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [O, I] float8 with scale_inv [ceil(O/bo), ceil(I/bi)] float32 -> [O, I] float32."""
    return dequantize_blocks(weight, scale_inv, block)


def iter_checkpoint(path: Path, cfg: ModelConfig, wanted: Callable[[str], bool] | None = None,
                    raw_fp8: Callable[[str], bool] | None = None, dtype: torch.dtype = torch.float32
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each weight of the served layers (those `wanted` accepts, by name; default all),
    FP8 weights dequantized to `dtype`, except those `raw_fp8` accepts: they come as they are, each followed by
    its block scales (NAME_scale_inv)."""
    files = tensor_files(path)
    block = cfg.quant_block_size or (128, 128)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(SafetensorsFile(f)) for f in sorted(set(files.values()))}
        names = [n for n in files if _served(n, cfg) and (wanted is None or wanted(n))]
        total = sum(handles[files[n]].nbytes(n) + handles[files.get(n + _SCALE_SUFFIX, files[n])].nbytes(
            n + _SCALE_SUFFIX) for n in names)
        # Bytes read, on a terminal only (disable=None): logs of services and CI stay clean.
        bar = stack.enter_context(tqdm(total=total, desc="Loading weights", unit="B", unit_scale=True,
                                       disable=None, leave=False))
        for name in names:
            f = files[name]
            try:
                t = handles[f].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {name} from {f}: {e}") from None
            bar.update(t.numel() * t.element_size())
            if t.dtype in _FP8:
                scale_name = name + _SCALE_SUFFIX
                if scale_name not in files:
                    raise CheckpointError(f"FP8 tensor {name} has no {scale_name}")
                scale = handles[files[scale_name]].get_tensor(scale_name)
                bar.update(scale.numel() * scale.element_size())
                if raw_fp8 is not None and raw_fp8(name):
                    yield name, t
                    yield scale_name, scale
                    continue
                t = dequantize_blocks(t, scale, block, dtype)
            yield name, t


def _served(name: str, cfg: ModelConfig) -> bool:
    """Whether a checkpoint tensor is a weight the model takes (not a scale, nor a layer past the decoder stack)."""
    if name.endswith(_SCALE_SUFFIX) or name.endswith("rotary_emb.inv_freq"):
        return False
    layer = layer_of(name)
    return layer is None or layer < cfg.num_hidden_layers  # multi-token-prediction layers are not served


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               experts: ExpertSelection | None = None, fp8_experts: bool = True) -> DeepseekForCausalLM:
    """Build the model described by `path/config.json` and fill it from the folder's safetensors.

    `experts`: hold only these routed experts (see `ExpertSelection`); each MoE layer's `RoutedExperts` then has
    one row per local slot and its `logical_ids`; None holds them all.
    `fp8_experts`: in an FP8 checkpoint, keep the routed experts in 8 bits with their block scales (one copy;
    converted one expert at a time when computed) instead of converting them to the compute dtype at load.
    Other weights are converted at load either way.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist")
    try:
        cfg = ModelConfig.from_dir(path)
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None
    torch_dtype = resolve_dtype(cfg, dtype)
    # Build on the meta device so that no time is spent initialising weights about to be overwritten.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            model = DeepseekForCausalLM(cfg)
            held = _hold_experts(model, experts) if experts is not None else None
            fp8_block = (cfg.quant_block_size or (128, 128)) if fp8_experts and _is_fp8(path, cfg) else None
            if fp8_block:
                for moe in (m for m in model.modules() if isinstance(m, MoE)):
                    e = moe.experts
                    moe.experts = RoutedExperts(e.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                                logical_ids=e.logical_ids, fp8_block=fp8_block)
    finally:
        torch.set_default_dtype(prev)
    model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.rebuild(device)
    wanted = None
    if held is not None:
        def wanted(name: str) -> bool:
            at = expert_of(name)
            return at is None or at[1] in held[at[0]]
    raw = (lambda name: expert_of(name) is not None) if fp8_block else None
    fill_weights(model, iter_checkpoint(path, cfg, wanted, raw, torch_dtype), held)
    return model.eval().requires_grad_(False)


def _is_fp8(path: Path, cfg: ModelConfig) -> bool:
    """Whether the checkpoint ships block-quantized FP8 weights (its config says so, as DeepSeek-V3's does)."""
    return cfg.quant_block_size is not None


def _hold_experts(model: DeepseekForCausalLM, experts: ExpertSelection) -> dict[int, dict[int, list[int]]]:
    """Give each MoE layer (on the meta device) a `RoutedExperts` of only its selected slots.

    -> decoder layer index -> logical expert -> the local slots it fills.
    """
    held: dict[int, dict[int, list[int]]] = {}
    cfg = model.config
    moe_index = 0
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, MoE):
            continue
        ids = [int(e) for e in experts(moe_index)]
        bad = [e for e in ids if not 0 <= e < (cfg.n_routed_experts or 0)]
        if bad:
            raise CheckpointError(f"MoE layer {moe_index}: experts {bad[:3]} do not exist "
                                  f"(the model has {cfg.n_routed_experts})")
        layer.mlp.experts = RoutedExperts(len(ids), cfg.hidden_size, cfg.moe_intermediate_size, logical_ids=ids)
        slots: dict[int, list[int]] = {}
        for slot, e in enumerate(ids):
            slots.setdefault(e, []).append(slot)
        held[i] = slots
        moe_index += 1
    return held


def fill_weights(model: DeepseekForCausalLM, tensors: Iterator[tuple[str, torch.Tensor]],
                 held: dict[int, dict[int, list[int]]] | None = None) -> None:
    """Copy checkpoint tensors into the model; every expected tensor must appear once, with its shape.

    `held` (from `_hold_experts`): the model holds only these routed experts; only their tensors are expected,
    each copied into every local slot it fills.
    """
    expected = checkpoint_shapes(model.config)
    if held is not None:
        expected = {n: s for n, s in expected.items()
                    if (at := expert_of(n)) is None or at[1] in held[at[0]]}
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, t in tensors:
            if name.endswith(_SCALE_SUFFIX):  # an FP8 expert's block scales, right after its weight
                _copy_into_slots(state, name.removesuffix(_SCALE_SUFFIX), t, held, scale=True)
                continue
            shape = expected.get(name)
            if shape is None:
                unexpected.append(name)
                continue
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, config implies {shape}")
            _copy_into_slots(state, name, t, held)
            seen.add(name)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensors the config does not describe, e.g. {unexpected[:3]}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def _copy_into_slots(state: dict[str, torch.Tensor], name: str, t: torch.Tensor,
                     held: dict[int, dict[int, list[int]]] | None, scale: bool = False) -> None:
    """Copy checkpoint tensor `name` (or, `scale`, that weight's FP8 block scales) into every place it fills."""
    tgt = target_of(name)
    param = state[tgt.param + "_scale_inv" if scale else tgt.param]  # experts.w13 -> experts.w13_scale_inv
    if not scale and param.dtype in _FP8 and t.dtype not in _FP8:
        raise CheckpointError(f"tensor {name} is {t.dtype} where the checkpoint's experts are FP8 with block scales")
    slots = [tgt.expert] if held is None or tgt.expert is None else held[layer_of(name)][tgt.expert]
    for slot in slots:
        dst = param if slot is None else param[slot]
        if tgt.half is not None:
            # A weight's gate/up half is a block of rows; its scales are their own [2, ...] entry.
            dst = dst[tgt.half] if scale else dst[tgt.half * (dst.shape[0] // 2):(tgt.half + 1) * (dst.shape[0] // 2)]
        if scale and tuple(dst.shape) != tuple(t.shape):
            raise CheckpointError(f"{name}{_SCALE_SUFFIX} has shape {tuple(t.shape)}, the weight's blocks need "
                                  f"{tuple(dst.shape)}")
        dst.copy_(t)
