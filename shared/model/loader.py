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
from safetensors import safe_open
from tqdm import tqdm

from moemesh.model.config import ModelConfig, ModelConfigError
from moemesh.model.deepseek import DeepseekForCausalLM
from moemesh.model.moe import MoE, RoutedExperts
from moemesh.model.rope import RotaryEmbedding
from moemesh.model.weights import checkpoint_shapes, expert_of, layer_of, target_of

# The routed experts a process holds: MoE layer index (0-based among MoE layers) -> the logical expert of each of
# its local slots, in slot order (an expert may appear more than once: redundant replicas).
ExpertSelection = Callable[[int], Sequence[int]]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
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
            with safe_open(f, framework="pt") as fh:
                out.update((k, f) for k in fh.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return out


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [O, I] float8 with scale_inv [ceil(O/bo), ceil(I/bi)] float32 -> [O, I] float32."""
    bo, bi = block
    o, i = weight.shape
    scale = scale_inv.float().repeat_interleave(bo, dim=0)[:o].repeat_interleave(bi, dim=1)[:, :i]
    return weight.float() * scale


def iter_checkpoint(path: Path, cfg: ModelConfig, wanted: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each weight of the served layers (those `wanted` accepts, by name; default all),
    FP8 weights already dequantized."""
    files = tensor_files(path)
    block = cfg.quant_block_size or (128, 128)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in sorted(set(files.values()))}
        for name, f in files.items():
            if name.endswith(_SCALE_SUFFIX) or name.endswith("rotary_emb.inv_freq"):
                continue
            layer = layer_of(name)
            if layer is not None and layer >= cfg.num_hidden_layers:
                continue  # multi-token-prediction layers beyond the decoder stack are not served
            if wanted is not None and not wanted(name):
                continue
            try:
                t = handles[f].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {name} from {f}: {e}") from None
            if t.dtype in _FP8:
                scale_name = name + _SCALE_SUFFIX
                if scale_name not in files:
                    raise CheckpointError(f"FP8 tensor {name} has no {scale_name}")
                t = dequantize_fp8(t, handles[files[scale_name]].get_tensor(scale_name), block)
            yield name, t


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               experts: ExpertSelection | None = None) -> DeepseekForCausalLM:
    """Build the model described by `path/config.json` and fill it from the folder's safetensors.

    `experts`: hold only these routed experts (see `ExpertSelection`); each MoE layer's `RoutedExperts` then has
    one row per local slot and its `logical_ids`; None holds them all.
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
    fill_weights(model, iter_checkpoint(path, cfg, wanted), held)
    return model.eval().requires_grad_(False)


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
    # A bar on a terminal only (disable=None): logs of services and CI stay clean.
    bar = tqdm(total=len(expected), desc="Loading weights", unit="tensor", disable=None, leave=False)
    with torch.no_grad(), bar:
        for name, t in tensors:
            bar.update()
            shape = expected.get(name)
            if shape is None:
                unexpected.append(name)
                continue
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, config implies {shape}")
            tgt = target_of(name)
            param = state[tgt.param]
            slots = [tgt.expert] if held is None or tgt.expert is None else held[layer_of(name)][tgt.expert]
            for slot in slots:
                dst = param if slot is None else param[slot]
                if tgt.half is not None:
                    rows = dst.shape[0] // 2
                    dst = dst[tgt.half * rows:(tgt.half + 1) * rows]
                dst.copy_(t)
            seen.add(name)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensors the config does not describe, e.g. {unexpected[:3]}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
