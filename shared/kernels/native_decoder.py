"""A decoder layer's attention half and its MoE half at decode sizes, in one native call each (`mla_layer_bf16.c`,
`moe_layer_bf16.c`).

At the small benchmark shape's decode batch a layer's attention half is twelve native kernel calls and ~60 small
torch ops around them (views, splits, the tensors each call returns, the cache write's concatenation and scatter),
its MoE half four calls and ~25 ops; in Python they cost more than the arithmetic. Each call runs the same native
functions in the same order on the same rounded intermediates, so it computes the same bits as the per-module
kernels it replaces, and it takes a step only where each of those would have run natively.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from moemesh.kernels import native
from moemesh.kernels.native_experts import MAX_ROWS as EXPERTS_MAX_ROWS
from moemesh.kernels.native_experts import NativeExperts
from moemesh.kernels.native_layers import NativeLinear
from moemesh.model.deepseek import DecoderLayer
from moemesh.model.layers import GatedMLP
from moemesh.model.moe import MoE, RoutedExperts


class _Pointers:
    """Data pointers for a layer's struct, each tensor held (a view of the parameter of record: in-place writes,
    expert moves among them, are seen) so that its pointer stays valid while the struct lives."""

    def __init__(self) -> None:
        self.held: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor | None) -> int | None:
        """t's data pointer (None, NULL in C, for a missing tensor)."""
        if t is None:
            return None
        self.held.append(t.detach())
        return t.data_ptr()


class NativeDecoderAttention:
    """A `DecoderLayer`'s attention kernel: steps in which every token decodes (an attention backend whose
    `decode_only` gives the layer's cache and the step's layout) of at most as many rows as each of the layer's
    linear kernels takes natively; None (the modules' forms) for anything else."""

    def __init__(self, lib: ctypes.CDLL, layer: DecoderLayer, max_rows: int) -> None:
        """`max_rows`: the fewest rows any of the layer's projections takes natively."""
        self.lib = lib
        self.layer = layer
        self.max_rows = max_rows
        attn = layer.self_attn
        ptr = _Pointers()
        self._tensors = ptr.held
        self.struct = native.MlaLayer(
            D=attn.q_a_proj.in_features, Q=attn.q_a_proj.out_features, H=attn.num_heads, Dn=attn.nope_dim,
            R=attn.rope_dim, C=attn.kv_lora_rank, V=attn.v_dim, in_norm=ptr(layer.input_layernorm.weight),
            q_a=ptr(attn.q_a_proj.weight), q_a_bias=ptr(attn.q_a_proj.bias), q_a_norm=ptr(attn.q_a_layernorm.weight),
            q_b=ptr(attn.q_b_proj.weight), kv_a=ptr(attn.kv_a_proj_with_mqa.weight),
            kv_a_bias=ptr(attn.kv_a_proj_with_mqa.bias), kv_a_norm=ptr(attn.kv_a_layernorm.weight),
            kv_b=ptr(attn.kv_b_proj.weight), o=ptr(attn.o_proj.weight), o_bias=ptr(attn.o_proj.bias),
            post_norm=ptr(layer.post_attention_layernorm.weight), in_eps=layer.input_layernorm.eps,
            q_eps=attn.q_a_layernorm.eps, kv_eps=attn.kv_a_layernorm.eps, post_eps=layer.post_attention_layernorm.eps,
            scale=attn.softmax_scale, interleave=int(attn.rotary.interleave))

    @staticmethod
    def max_rows_of(layer: DecoderLayer) -> int:
        """The rows up to which the layer's attention half can run in one call: 0 where some part of it has no
        native kernel (no low-rank query, a weight not bf16 or not contiguous, a projection without the native
        linear kernel), else the fewest rows its projections take natively."""
        attn = layer.self_attn
        if not hasattr(attn, "q_a_proj"):
            return 0
        linears = (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj)
        if not all(isinstance(m.kernel, NativeLinear) for m in linears):
            return 0
        weights = [m.weight for m in (*linears, attn.kv_b_proj, layer.input_layernorm, attn.q_a_layernorm,
                                      attn.kv_a_layernorm, layer.post_attention_layernorm)]
        if not all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in weights):
            return 0
        return min(m.kernel.max_rows for m in linears)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, backend: object
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [T, D] bf16, positions [T] int64 -> (x + attention [T, D], its post-attention norm [T, D]), or None.
        Takes steps whose backend says every sequence decodes (`decode_only`: the engine's paged attention)."""
        decode_only = getattr(backend, "decode_only", None)
        if decode_only is None or not 0 < x.shape[0] <= self.max_rows:
            return None
        step = decode_only(self.layer.self_attn.layer_idx)
        if step is None:
            return None
        rope = self.layer.self_attn.rotary
        cos, sin = rope.cos_cached, rope.sin_cached
        if not (x.dtype == step.cache.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()
                and step.cache.is_contiguous() and positions.dtype == torch.int64
                and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()):
            return None
        return native.mla_layer_decode(self.lib, self.struct, x, positions, cos, sin, step.cache, step.slots,
                                       step.pages, step.lens, step.page_size)


@functools.cache
def silu_table() -> torch.Tensor:
    """torch's SiLU at every bf16 bit pattern: [65536] bf16, entry i for the input whose bits are i. Made by torch's
    own vectorised kernel, the one a shared expert's rows (a multiple of 32 wide) take, so a lookup is its bits."""
    bits = torch.arange(65536, dtype=torch.int32)
    every = (bits - (bits >= 32768).int() * 65536).to(torch.int16)  # the bit patterns as int16, in order
    return F.silu(every.view(torch.bfloat16))  # contiguous: torch's vector form throughout


class NativeDecoderMoE:
    """A `DecoderLayer`'s MLP kernel for a MoE layer: after its router (the module, so that hooks on it see the
    choice), the shared and routed experts and the residual add in one call, for steps of at most as many tokens as
    each of the per-module native kernels takes; None (the modules' forms) for anything else."""

    def __init__(self, lib: ctypes.CDLL, layer: DecoderLayer, max_rows: int) -> None:
        """`max_rows`: from `max_rows_of`, the fewest rows any of the layer's expert kernels takes natively."""
        self.lib = lib
        self.max_rows = max_rows
        self.moe: MoE = layer.mlp
        self.experts: RoutedExperts = self.moe.experts
        self.experts_kernel = self.experts.kernel
        shared = self.moe.shared_experts
        ptr = _Pointers()
        self._tensors = ptr.held
        e, two_i, d = self.experts.w13.shape
        self.struct = native.MoeLayer(
            D=d, E=e, K=self.moe.gate.top_k, I=two_i // 2, Is=0 if shared is None else shared.intermediate,
            w13=ptr(self.experts.w13), w2=ptr(self.experts.w2),
            gate_up=ptr(None if shared is None else shared.gate_up.weight),
            down=ptr(None if shared is None else shared.down.weight), silu=ptr(silu_table()))

    @staticmethod
    def max_rows_of(layer: DecoderLayer) -> int:
        """The tokens up to which the layer's MLP half can run in one call: 0 where it is not a MoE layer whose routed
        experts have the native kernel in bf16 on this CPU and whose shared expert (if any) has native linear
        kernels and a width the SiLU table matches, else the fewest rows those kernels take natively."""
        moe = layer.mlp
        if not (isinstance(moe, MoE) and type(moe.experts) is RoutedExperts and moe.experts.logical_ids is None
                and moe.experts.fp8_block is None and isinstance(moe.experts.kernel, NativeExperts)):
            return 0
        weights = [moe.experts.w13, moe.experts.w2]
        rows = EXPERTS_MAX_ROWS
        shared = moe.shared_experts
        if shared is not None:
            # torch computes a row's SiLU in vectors (two of 32 bf16 at a time on AVX-512) and a shorter tail in
            # scalar code, whose exp could round differently where it does not agree with the vector one (on this
            # host they agree on every finite input; the test checks the table against strided rows).
            if not (isinstance(shared, GatedMLP) and shared.intermediate % 32 == 0
                    and isinstance(shared.gate_up.kernel, NativeLinear) and isinstance(shared.down.kernel, NativeLinear)
                    and shared.gate_up.bias is None and shared.down.bias is None):
                return 0
            weights += [shared.gate_up.weight, shared.down.weight]
            rows = min(rows, shared.gate_up.kernel.max_rows, shared.down.kernel.max_rows)
        if not all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in weights):
            return 0
        return rows

    def __call__(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """x [T, D] bf16 (the stream after attention), h [T, D] bf16 (its norm) -> x + the layer's MLP [T, D], or
        None."""
        if not (0 < x.shape[0] <= self.max_rows and x.dtype == h.dtype == torch.bfloat16 and x.device.type == "cpu"
                and self.moe.experts is self.experts and self.experts.kernel is self.experts_kernel):
            return None  # a larger step, or expert parallelism or a new kernel set took the experts over since
        topk_ids, topk_weights = self.moe.gate(h)
        return native.moe_layer_decode(self.lib, self.struct, x, h, topk_ids, topk_weights)
