from loraserve.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class AdapterLocation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_LOCATION_UNSPECIFIED: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_GPU: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_HOST: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_DISK: _ClassVar[AdapterLocation]
    ADAPTER_LOCATION_MERGED: _ClassVar[AdapterLocation]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason
ADAPTER_LOCATION_UNSPECIFIED: AdapterLocation
ADAPTER_LOCATION_GPU: AdapterLocation
ADAPTER_LOCATION_HOST: AdapterLocation
ADAPTER_LOCATION_DISK: AdapterLocation
ADAPTER_LOCATION_MERGED: AdapterLocation

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "plan", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    plan: _common_pb2.LoraPlan
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.LoraPlan, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage", "time_to_first_token_ms", "total_time_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: _common_pb2.Usage
    time_to_first_token_ms: float
    total_time_ms: float
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., time_to_first_token_ms: _Optional[float] = ..., total_time_ms: _Optional[float] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "plan", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    plan: _common_pb2.LoraPlan
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.LoraPlan, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage", "time_to_first_token_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: _common_pb2.Usage
    time_to_first_token_ms: float
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., time_to_first_token_ms: _Optional[float] = ...) -> None: ...

class ResidentAdapter(_message.Message):
    __slots__ = ("adapter_id", "version", "location", "slot", "active_requests", "pinned", "size_bytes")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    location: AdapterLocation
    slot: int
    active_requests: int
    pinned: bool
    size_bytes: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., location: _Optional[_Union[AdapterLocation, str]] = ..., slot: _Optional[int] = ..., active_requests: _Optional[int] = ..., pinned: _Optional[bool] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter", "pin")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterRef
    pin: bool
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterRef, _Mapping]] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: ResidentAdapter
    def __init__(self, adapter: _Optional[_Union[ResidentAdapter, _Mapping]] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterRef
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterRef, _Mapping]] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResidentAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResidentAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "slots_total", "slots_free")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    slots_total: int
    slots_free: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., slots_total: _Optional[int] = ..., slots_free: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("replica_id", "base_model", "queue_depth", "running_requests", "resident_adapters", "kv_blocks_total", "kv_blocks_free", "adapter_slots_total", "adapter_slots_free", "adapter_memory_bytes_total", "adapter_memory_bytes_free", "merged_adapter_id", "requests_completed", "tokens_generated", "device")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MEMORY_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MEMORY_BYTES_FREE_FIELD_NUMBER: _ClassVar[int]
    MERGED_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    base_model: str
    queue_depth: int
    running_requests: int
    resident_adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    kv_blocks_total: int
    kv_blocks_free: int
    adapter_slots_total: int
    adapter_slots_free: int
    adapter_memory_bytes_total: int
    adapter_memory_bytes_free: int
    merged_adapter_id: str
    requests_completed: int
    tokens_generated: int
    device: str
    def __init__(self, replica_id: _Optional[str] = ..., base_model: _Optional[str] = ..., queue_depth: _Optional[int] = ..., running_requests: _Optional[int] = ..., resident_adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., adapter_slots_total: _Optional[int] = ..., adapter_slots_free: _Optional[int] = ..., adapter_memory_bytes_total: _Optional[int] = ..., adapter_memory_bytes_free: _Optional[int] = ..., merged_adapter_id: _Optional[str] = ..., requests_completed: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...
