"""The KV layout: what a worker's KV cache pages hold, so that two workers can tell whether a page of one can be
copied into a page of the other as it is.

One concept, one name: a prefill or decode worker describes its cache with a `KvLayout`, kvtransfer checks a
room's sender against its receiver with it, and the gateway pairs prefill with decode workers with it. On the
wire it is the proto `moemesh.v1.KvLayout`, field for field (`to_proto` / `from_proto`). Torch-free: the gateway
and kvtransfer import it; the worker's side (the model fingerprint, the torch dtype) is `moemesh.worker.kv_layout`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moemesh.v1 import common_pb2


@dataclass(frozen=True)
class KvLayout:
    """A worker's KV cache layout; a sender and a receiver must agree on every field.

    A page holds `page_size_tokens` rows per layer, each row the latent (C = kv_lora_rank values) then the
    rotary key (R = qk_rope_head_dim values) in `dtype`: a layer's page is [page_size_tokens, C + R].
    """

    model_fingerprint: str  # equal for two workers only when they serve the same architecture, weights and dtype
    num_layers: int  # L: layers with a KV cache
    page_size_tokens: int
    kv_lora_rank: int  # C
    qk_rope_head_dim: int  # R
    dtype: str  # the proto's KvDtype name ("KV_DTYPE_BFLOAT16"), or the number of one this build does not know

    @classmethod
    def from_proto(cls, msg: common_pb2.KvLayout) -> KvLayout:
        """The layout a message carries; the dtype by name, so that mismatch messages read well."""
        known = msg.dtype in common_pb2.KvDtype.values()
        return cls(model_fingerprint=msg.model_fingerprint, num_layers=msg.num_layers,
                   page_size_tokens=msg.page_size_tokens, kv_lora_rank=msg.kv_lora_rank,
                   qk_rope_head_dim=msg.qk_rope_head_dim,
                   dtype=common_pb2.KvDtype.Name(msg.dtype) if known else str(msg.dtype))

    def to_proto(self) -> common_pb2.KvLayout:
        """The message that carries this layout (`from_proto` of it gives it back)."""
        dtype = int(self.dtype) if self.dtype.isdigit() else common_pb2.KvDtype.Value(self.dtype)
        return common_pb2.KvLayout(model_fingerprint=self.model_fingerprint, num_layers=self.num_layers,
                                   page_size_tokens=self.page_size_tokens, kv_lora_rank=self.kv_lora_rank,
                                   qk_rope_head_dim=self.qk_rope_head_dim, dtype=dtype)

    def differences(self, receiver: KvLayout) -> list[str]:
        """With this layout the sender's: one line per field where the two differ, naming the field and both
        values ("num_layers: sender 4, receiver 3"); empty when pages can be copied as they are."""
        out = []
        for f in dataclasses.fields(KvLayout):
            s, r = getattr(self, f.name), getattr(receiver, f.name)
            if s != r:
                out.append(f"{f.name}: sender {s!r}, receiver {r!r}")
        return out

    def compatible(self, other: KvLayout) -> bool:
        """True when KV pages of this layout can be copied into pages of `other` as they are."""
        return self == other
