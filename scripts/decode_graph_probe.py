"""Probe: what one decode step would gain as a single compiled graph (torch.compile / inductor) on this CPU.

Not a serving path. It answers, for one checkpoint and batch size, before anyone builds the real thing:
  - the eager decode forward's time (the engine's installed kernels) against the same step written as one
    graph-friendly function and compiled with inductor (weights frozen, so its linears are prepacked);
  - the compile time, static shapes and dynamic ones;
  - accuracy: both bf16 forms against the same function run in float32 on the same weights and cache.

The graph form differs from the model's forward in three ways a compiler needs: the routed experts run as two
matmuls over every expert (no data-dependent row counts), rope is the real-valued form (inductor does not
generate code for complex numbers), and the step's new latents are returned instead of written into the cache
inside the graph (a write there made inductor copy the whole cache on every call).

    python scripts/decode_graph_probe.py --model out/bench_vs_vllm/small/ckpt --batch 4 [--dynamic]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.bench import profile as engine_profile
from moemesh.engine.attention import PagedAttention
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.moe import MoE


class DecodeGraph(nn.Module):
    """The model's decode forward for B single-token sequences over the paged latent cache, in one graph."""

    def __init__(self, model: nn.Module, num_pages: int, page_size: int) -> None:
        super().__init__()
        self.m, self.num_pages, self.ps = model, num_pages, page_size
        self.interleave = model.model.layers[0].self_attn.rotary.interleave
        self.all13, self.all2 = nn.ParameterList(), nn.ParameterList()
        self.wuk, self.wuv = nn.ParameterList(), nn.ParameterList()
        for layer in model.model.layers:
            uk, uv = layer.self_attn._absorbed()
            self.wuk.append(nn.Parameter(uk.clone(), requires_grad=False))
            self.wuv.append(nn.Parameter(uv.clone(), requires_grad=False))
            if isinstance(layer.mlp, MoE):
                w13, w2 = layer.mlp.experts.w13.detach(), layer.mlp.experts.w2.detach()
                self.all13.append(nn.Parameter(w13.reshape(-1, w13.shape[-1]).clone(), requires_grad=False))
                self.all2.append(nn.Parameter(w2.permute(1, 0, 2).reshape(w2.shape[1], -1).clone(),
                                              requires_grad=False))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., R], cos/sin [..., R/2] -> rotated [..., R] in the model's layout (evens first when interleaved)."""
        xf = x.float()
        a, b = (xf[..., 0::2], xf[..., 1::2]) if self.interleave else xf.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, pages: torch.Tensor, lens: torch.Tensor,
                cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, positions [B] int64; pages [B, P] int64; lens [B] int64 (KV length with the new token);
        cache [L, S, C + R] -> (hidden [B, D], the new tokens' latents [L, B, C + R])."""
        m, b = self.m.model, ids.shape[0]
        rot = m.layers[0].self_attn.rotary
        cos, sin = rot.cos_cached[positions], rot.sin_cached[positions]
        n = pages.shape[1] * self.ps
        past = torch.arange(n, device=ids.device)[None, :] < (lens[:, None] - 1)
        bias = torch.cat((torch.zeros(b, n, device=ids.device).masked_fill(~past, float("-inf")),
                          torch.zeros(b, 1, device=ids.device)), dim=1)[:, :, None]
        x, new_rows, moe_i = m.embed_tokens(ids), [], 0
        for li, layer in enumerate(m.layers):
            at = layer.self_attn
            h = layer.input_layernorm(x)
            q = at.q_b_proj(at.q_a_layernorm(at.q_a_proj(h))).view(b, at.num_heads, at.nope_dim + at.rope_dim)
            q_nope, q_pe = q.split([at.nope_dim, at.rope_dim], dim=-1)
            c_kv, k_pe = at.kv_a_proj_with_mqa(h).split([at.kv_lora_rank, at.rope_dim], dim=-1)
            cur = torch.cat((at.kv_a_layernorm(c_kv), self._rope(k_pe, cos, sin)), dim=-1)
            new_rows.append(cur)
            kv = cache[li].view(self.num_pages, self.ps, -1).index_select(0, pages.reshape(-1)).view(b, n, -1)
            kv = torch.cat((kv, cur[:, None, :]), dim=1)
            q_lat = torch.bmm(q_nope.transpose(0, 1), self.wuk[li]).transpose(0, 1)
            qq = torch.cat((q_lat, self._rope(q_pe, cos[:, None, :], sin[:, None, :])), dim=-1)
            probs = torch.softmax(torch.bmm(kv, qq.transpose(1, 2)).float() * at.softmax_scale + bias, dim=1)
            o_lat = torch.bmm(probs.to(kv.dtype).transpose(1, 2), kv)[..., : at.kv_lora_rank]
            o = torch.bmm(o_lat.transpose(0, 1), self.wuv[li]).transpose(0, 1)
            x = x + at.o_proj(o.reshape(b, -1))
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                topk_ids, topk_w = mlp.gate(h)
                e = mlp.experts.num_experts
                gates = h.new_zeros(b, e).scatter_(1, topk_ids, topk_w.to(h.dtype))
                gu = F.linear(h, self.all13[moe_i]).view(b, e, 2, -1)
                out = F.linear((F.silu(gu[:, :, 0]) * gu[:, :, 1] * gates[:, :, None]).reshape(b, -1),
                               self.all2[moe_i])
                if mlp.shared_experts is not None:
                    out = out + mlp.shared_experts(h)
                moe_i += 1
            else:
                out = mlp(h)
            x = x + out
        return m.norm(x), torch.stack(new_rows)


def _times_ms(fn, n: int = 30) -> tuple[float, float]:
    """(best, median) of n calls after 3 warm-ups, in ms."""
    for _ in range(3):
        fn()
    ts = sorted(_timed(fn) for _ in range(n))
    return ts[0] * 1e3, ts[n // 2] * 1e3


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes (default: static)")
    args = p.parse_args()
    torch.set_num_threads(1)
    engine = engine_profile._engine(argparse.Namespace(model=args.model, dtype="auto", batch=args.batch,
                                                       prompt_len=args.prompt_len, num_threads=1, kernels="auto"))
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    for prompt in engine_profile._prompts(args.batch, args.prompt_len, engine.model.config.vocab_size):
        engine.add_request(prompt, params)
    engine.step()
    engine.step()
    runner, cache = engine.runner, engine.cache
    ids, pos, layout, _ = runner.prepare(list(engine.schedule().seqs))
    lens = layout.decode_mask.sum(1)
    with torch.inference_mode():
        eager = _times_ms(lambda: runner.model(ids, pos, PagedAttention(cache, layout)))
    # The graph takes the plain weights (inductor prepacks its own, frozen copy); opaque prepacked kernels
    # cannot be traced or copied.
    for module in runner.model.modules():
        if getattr(module, "kernel", None) is not None:
            module.kernel = None
    graph = DecodeGraph(runner.model, cache.num_pages, cache.page_size).eval()
    graph32 = DecodeGraph(copy.deepcopy(runner.model).float(), cache.num_pages, cache.page_size).eval()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    with torch.inference_mode():
        def step(g=graph, kv=cache.data):
            return g(ids, pos, layout.decode_pages, lens, kv)

        t0 = time.perf_counter()
        compiled = torch.compile(graph, dynamic=args.dynamic, fullgraph=True)
        out = compiled(ids, pos, layout.decode_pages, lens, cache.data)[0]
        compile_s = time.perf_counter() - t0
        fast = _times_ms(lambda: compiled(ids, pos, layout.decode_pages, lens, cache.data))
        ref32 = step(graph32, cache.data.float())[0]

        def rel(a: torch.Tensor) -> float:
            return float((a.float() - ref32).norm() / ref32.norm())

        print(f"{args.model}, batch {args.batch}, KV {int(lens.max())} tokens, one thread")
        print(f"eager model forward (installed kernels): best {eager[0]:.2f} ms, median {eager[1]:.2f} ms")
        print(f"compiled graph ({'dynamic' if args.dynamic else 'static'} shapes): best {fast[0]:.2f} ms, "
              f"median {fast[1]:.2f} ms ({eager[0] / fast[0]:.2f}x); compile {compile_s:.1f} s")
        print(f"relative error against float32 on the same weights: eager-form bf16 {rel(step()[0]):.4f}, "
              f"compiled bf16 {rel(out):.4f}")


if __name__ == "__main__":
    main()
