from moemesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoomState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROOM_STATE_UNSPECIFIED: _ClassVar[RoomState]
    ROOM_STATE_BOOTSTRAPPING: _ClassVar[RoomState]
    ROOM_STATE_WAITING_FOR_INPUT: _ClassVar[RoomState]
    ROOM_STATE_TRANSFERRING: _ClassVar[RoomState]
    ROOM_STATE_SUCCESS: _ClassVar[RoomState]
    ROOM_STATE_FAILED: _ClassVar[RoomState]

class DataPlane(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_PLANE_UNSPECIFIED: _ClassVar[DataPlane]
    DATA_PLANE_UCX: _ClassVar[DataPlane]
    DATA_PLANE_RELAY: _ClassVar[DataPlane]
    DATA_PLANE_INPROC: _ClassVar[DataPlane]
ROOM_STATE_UNSPECIFIED: RoomState
ROOM_STATE_BOOTSTRAPPING: RoomState
ROOM_STATE_WAITING_FOR_INPUT: RoomState
ROOM_STATE_TRANSFERRING: RoomState
ROOM_STATE_SUCCESS: RoomState
ROOM_STATE_FAILED: RoomState
DATA_PLANE_UNSPECIFIED: DataPlane
DATA_PLANE_UCX: DataPlane
DATA_PLANE_RELAY: DataPlane
DATA_PLANE_INPROC: DataPlane

class RegisterReceiverRequest(_message.Message):
    __slots__ = ("protocol_version", "room_id", "request_id", "layout", "data_plane", "data_plane_address", "num_tokens", "lease_ms", "data_plane_name")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: _common_pb2.ProtocolVersion
    room_id: str
    request_id: str
    layout: _common_pb2.KvLayout
    data_plane: DataPlane
    data_plane_address: str
    num_tokens: int
    lease_ms: int
    data_plane_name: str
    def __init__(self, protocol_version: _Optional[_Union[_common_pb2.ProtocolVersion, str]] = ..., room_id: _Optional[str] = ..., request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KvLayout, _Mapping]] = ..., data_plane: _Optional[_Union[DataPlane, str]] = ..., data_plane_address: _Optional[str] = ..., num_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., data_plane_name: _Optional[str] = ...) -> None: ...

class RegisterReceiverResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: RoomState
    def __init__(self, state: _Optional[_Union[RoomState, str]] = ...) -> None: ...

class ResolveReceiverRequest(_message.Message):
    __slots__ = ("protocol_version", "room_id", "layout", "wait_ms", "lease_ms")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: _common_pb2.ProtocolVersion
    room_id: str
    layout: _common_pb2.KvLayout
    wait_ms: int
    lease_ms: int
    def __init__(self, protocol_version: _Optional[_Union[_common_pb2.ProtocolVersion, str]] = ..., room_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KvLayout, _Mapping]] = ..., wait_ms: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ResolveReceiverResponse(_message.Message):
    __slots__ = ("state", "data_plane", "data_plane_address", "num_tokens", "data_plane_name")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_NAME_FIELD_NUMBER: _ClassVar[int]
    state: RoomState
    data_plane: DataPlane
    data_plane_address: str
    num_tokens: int
    data_plane_name: str
    def __init__(self, state: _Optional[_Union[RoomState, str]] = ..., data_plane: _Optional[_Union[DataPlane, str]] = ..., data_plane_address: _Optional[str] = ..., num_tokens: _Optional[int] = ..., data_plane_name: _Optional[str] = ...) -> None: ...

class ReportTransferRequest(_message.Message):
    __slots__ = ("room_id", "state", "error", "bytes")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    state: RoomState
    error: str
    bytes: int
    def __init__(self, room_id: _Optional[str] = ..., state: _Optional[_Union[RoomState, str]] = ..., error: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ReportTransferResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: RoomState
    def __init__(self, state: _Optional[_Union[RoomState, str]] = ...) -> None: ...

class WatchRoomRequest(_message.Message):
    __slots__ = ("room_id",)
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    def __init__(self, room_id: _Optional[str] = ...) -> None: ...

class RoomStatus(_message.Message):
    __slots__ = ("room_id", "state", "error")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    state: RoomState
    error: str
    def __init__(self, room_id: _Optional[str] = ..., state: _Optional[_Union[RoomState, str]] = ..., error: _Optional[str] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("room_id", "chunk_index", "token_start", "num_tokens", "num_layers", "row_width", "dtype", "data", "checksum_crc32", "last", "first_token_id", "first_logprobs", "num_chunks")
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ROW_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    chunk_index: int
    token_start: int
    num_tokens: int
    num_layers: int
    row_width: int
    dtype: _common_pb2.KvDtype
    data: bytes
    checksum_crc32: int
    last: bool
    first_token_id: int
    first_logprobs: _common_pb2.StepLogprobs
    num_chunks: int
    def __init__(self, room_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., token_start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_layers: _Optional[int] = ..., row_width: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.KvDtype, str]] = ..., data: _Optional[bytes] = ..., checksum_crc32: _Optional[int] = ..., last: _Optional[bool] = ..., first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[_common_pb2.StepLogprobs, _Mapping]] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class PushChunksResponse(_message.Message):
    __slots__ = ("num_chunks", "bytes")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    bytes: int
    def __init__(self, num_chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class PullChunksRequest(_message.Message):
    __slots__ = ("room_id",)
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    room_id: str
    def __init__(self, room_id: _Optional[str] = ...) -> None: ...
