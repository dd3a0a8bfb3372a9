from moemesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertLoadReport(_message.Message):
    __slots__ = ("protocol_version", "instance_id", "role", "ep_rank", "num_layers", "num_logical_experts", "token_counts", "window_start_unix_ms", "window_end_unix_ms", "placement_version", "phy2log", "num_physical_experts", "ep_size", "num_expert_groups", "num_nodes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EP_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    NUM_PHYSICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERT_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: _common_pb2.ProtocolVersion
    instance_id: str
    role: _common_pb2.WorkerRole
    ep_rank: int
    num_layers: int
    num_logical_experts: int
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    window_start_unix_ms: int
    window_end_unix_ms: int
    placement_version: int
    phy2log: _containers.RepeatedScalarFieldContainer[int]
    num_physical_experts: int
    ep_size: int
    num_expert_groups: int
    num_nodes: int
    def __init__(self, protocol_version: _Optional[_Union[_common_pb2.ProtocolVersion, str]] = ..., instance_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., ep_rank: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_logical_experts: _Optional[int] = ..., token_counts: _Optional[_Iterable[int]] = ..., window_start_unix_ms: _Optional[int] = ..., window_end_unix_ms: _Optional[int] = ..., placement_version: _Optional[int] = ..., phy2log: _Optional[_Iterable[int]] = ..., num_physical_experts: _Optional[int] = ..., ep_size: _Optional[int] = ..., num_expert_groups: _Optional[int] = ..., num_nodes: _Optional[int] = ...) -> None: ...

class ReportExpertLoadResponse(_message.Message):
    __slots__ = ("num_reports",)
    NUM_REPORTS_FIELD_NUMBER: _ClassVar[int]
    num_reports: int
    def __init__(self, num_reports: _Optional[int] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ("instance_id", "role")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: _common_pb2.WorkerRole
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("version", "num_layers", "num_physical_experts", "phy2log", "ep_size", "previous_balancedness", "expected_balancedness", "num_moved_slots")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PHYSICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    NUM_MOVED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_layers: int
    num_physical_experts: int
    phy2log: _containers.RepeatedScalarFieldContainer[int]
    ep_size: int
    previous_balancedness: float
    expected_balancedness: float
    num_moved_slots: int
    def __init__(self, version: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_physical_experts: _Optional[int] = ..., phy2log: _Optional[_Iterable[int]] = ..., ep_size: _Optional[int] = ..., previous_balancedness: _Optional[float] = ..., expected_balancedness: _Optional[float] = ..., num_moved_slots: _Optional[int] = ...) -> None: ...
