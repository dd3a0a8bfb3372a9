"""The tables `moemesh bench ep` prints from its ranks' figures."""

from __future__ import annotations

from typing import Any


def report(results: dict[int, dict[str, Any]], preset: str) -> str:
    """results: EP size -> rank 0's JSON (keys are strings after the JSON round trip)."""
    sizes = sorted(results)
    base = results[sizes[0]]
    out = [f"moemesh bench ep: preset {preset!r}, EP groups of rank processes over gloo on this machine"]

    out.append("\none MoE layer (gate, experts, shared experts; dispatch+combine when EP > 1), ms per call")
    out.append(f"  {'tokens/rank':>11} " + " ".join(f"{'EP ' + str(s):>9}" for s in sizes)
               + "".join(f"  {f'EP{s}/EP{sizes[0]}':>9}" for s in sizes[1:]))
    for t in base["moe_layer_ms"]:
        ms = [results[s]["moe_layer_ms"][t] for s in sizes]
        out.append(f"  {t:>11} " + " ".join(f"{m:>9.2f}" for m in ms)
                   + "".join(f"  {m / ms[0]:>8.2f}x" for m in ms[1:]))

    out.append("\ndecode step, output tokens/s of the whole group (every rank decoding its batch)")
    out.append(f"  {'seqs/rank':>11} " + " ".join(f"{'EP ' + str(s):>9}" for s in sizes)
               + "".join(f"  {f'EP{s}/EP{sizes[0]}':>9}" for s in sizes[1:]))
    for b in base["decode_tok_s"]:
        tps = [results[s]["decode_tok_s"][b] for s in sizes]
        out.append(f"  {b:>11} " + " ".join(f"{v:>9.1f}" for v in tps)
                   + "".join(f"  {v / tps[0]:>8.2f}x" for v in tps[1:]))

    multi = [s for s in sizes if s > 1]
    if multi:
        out.append("\ndispatch+combine against bare all_to_all_single moving the same hidden-state bytes (MB/s)")
        out.append(f"  {'EP':>3} {'tokens/rank':>11} {'MB moved':>9} {'dispatch':>9} {'bare a2a':>9} {'ratio':>7}")
        for s in multi:
            for t, c in results[s]["comm"].items():
                mb = c["bytes"] / 1e6
                out.append(f"  {s:>3} {t:>11} {mb:>9.2f} {mb / c['ep_s']:>9.1f} {mb / c['bare_s']:>9.1f} "
                           f"{c['bare_s'] / c['ep_s']:>6.2f}x")
        out.append("\ntwo-batch overlap: decode tokens/s of the group, on against off")
        out.append(f"  {'EP':>3} {'seqs/rank':>9} {'off':>9} {'on':>9} {'on/off':>7}")
        for s in multi:
            for b, on in results[s]["tbo"].items():
                off = results[s]["decode_tok_s"][b]
                out.append(f"  {s:>3} {b:>9} {off:>9.1f} {on:>9.1f} {on / off:>6.2f}x")
    return "\n".join(out)
