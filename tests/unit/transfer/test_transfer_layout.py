"""`KvLayout`, the one KV layout the worker, kvtransfer and the gateway share: its wire form is the proto's, field
for field, and the compatibility verdict and mismatch lines name what differs."""

from __future__ import annotations

import dataclasses

import pytest

from moemesh.transfer.layout import KvLayout
from moemesh.v1 import common_pb2

PROTO = common_pb2.KvLayout(model_fingerprint="fp-1", num_layers=3, page_size_tokens=16, kv_lora_rank=32,
                            qk_rope_head_dim=16, dtype=common_pb2.KV_DTYPE_BFLOAT16)
LAYOUT = KvLayout("fp-1", 3, 16, 32, 16, "KV_DTYPE_BFLOAT16")


def test_from_proto_reads_every_field_and_names_the_dtype() -> None:
    assert KvLayout.from_proto(PROTO) == LAYOUT
    assert [f.name for f in dataclasses.fields(KvLayout)] == [f.name for f in common_pb2.KvLayout.DESCRIPTOR.fields]


@pytest.mark.parametrize("dtype", [*common_pb2.KvDtype.values(), 77])  # 77: a dtype a newer build may send
def test_the_wire_form_is_unchanged(dtype: int) -> None:
    msg = common_pb2.KvLayout()
    msg.CopyFrom(PROTO)
    msg.dtype = dtype
    back = KvLayout.from_proto(msg).to_proto()
    assert back == msg and back.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)


def test_an_empty_message_round_trips() -> None:
    empty = KvLayout.from_proto(common_pb2.KvLayout())
    assert empty == KvLayout("", 0, 0, 0, 0, "KV_DTYPE_UNSPECIFIED")
    assert empty.to_proto() == common_pb2.KvLayout()


def test_differences_name_each_differing_field_from_the_senders_side() -> None:
    sender = dataclasses.replace(LAYOUT, num_layers=4, dtype="KV_DTYPE_FLOAT32")
    assert sender.differences(LAYOUT) == ["num_layers: sender 4, receiver 3",
                                          "dtype: sender 'KV_DTYPE_FLOAT32', receiver 'KV_DTYPE_BFLOAT16'"]
    assert LAYOUT.differences(LAYOUT) == []


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(KvLayout)])
def test_any_one_field_makes_layouts_incompatible(field: str) -> None:
    other = dataclasses.replace(LAYOUT, **{field: "x" if isinstance(getattr(LAYOUT, field), str) else 99})
    assert not LAYOUT.compatible(other) and not other.compatible(LAYOUT)
    assert [line.split(":")[0] for line in other.differences(LAYOUT)] == [field]
    assert LAYOUT.compatible(dataclasses.replace(LAYOUT))
