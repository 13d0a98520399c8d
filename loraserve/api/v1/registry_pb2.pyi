import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from loraserve.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_EVENT_TYPE_UNSPECIFIED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_SNAPSHOT: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_SNAPSHOT_END: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_UPDATED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_DELETED: _ClassVar[AdapterEventType]
ADAPTER_EVENT_TYPE_UNSPECIFIED: AdapterEventType
ADAPTER_EVENT_TYPE_SNAPSHOT: AdapterEventType
ADAPTER_EVENT_TYPE_SNAPSHOT_END: AdapterEventType
ADAPTER_EVENT_TYPE_UPDATED: AdapterEventType
ADAPTER_EVENT_TYPE_DELETED: AdapterEventType

class PushAdapterHeader(_message.Message):
    __slots__ = ("adapter_id", "version", "base_model", "tags", "domain", "sample_inputs", "description", "files")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    base_model: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    domain: str
    sample_inputs: _containers.RepeatedScalarFieldContainer[str]
    description: str
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileInfo]
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., base_model: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., domain: _Optional[str] = ..., sample_inputs: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., files: _Optional[_Iterable[_Union[_common_pb2.FileInfo, _Mapping]]] = ...) -> None: ...

class PushAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushAdapterHeader
    chunk: _common_pb2.FileChunk
    def __init__(self, header: _Optional[_Union[PushAdapterHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.FileChunk, _Mapping]] = ...) -> None: ...

class PushAdapterResponse(_message.Message):
    __slots__ = ("adapter", "job_id")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.Adapter
    job_id: str
    def __init__(self, adapter: _Optional[_Union[_common_pb2.Adapter, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "version")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.Adapter
    def __init__(self, adapter: _Optional[_Union[_common_pb2.Adapter, _Mapping]] = ...) -> None: ...

class AdapterFilter(_message.Message):
    __slots__ = ("base_model", "statuses", "tags", "domain", "adapter_id_prefix", "include_deleted")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DELETED_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    statuses: _containers.RepeatedScalarFieldContainer[_common_pb2.AdapterStatus]
    tags: _containers.RepeatedScalarFieldContainer[str]
    domain: str
    adapter_id_prefix: str
    include_deleted: bool
    def __init__(self, base_model: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_common_pb2.AdapterStatus, str]]] = ..., tags: _Optional[_Iterable[str]] = ..., domain: _Optional[str] = ..., adapter_id_prefix: _Optional[str] = ..., include_deleted: _Optional[bool] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: AdapterFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[AdapterFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token", "total_size")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.Adapter]
    next_page_token: str
    total_size: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[_common_pb2.Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "version")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[_common_pb2.Adapter]
    def __init__(self, deleted: _Optional[_Iterable[_Union[_common_pb2.Adapter, _Mapping]]] = ...) -> None: ...

class WatchAdaptersRequest(_message.Message):
    __slots__ = ("filter", "send_initial_state")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    filter: AdapterFilter
    send_initial_state: bool
    def __init__(self, filter: _Optional[_Union[AdapterFilter, _Mapping]] = ..., send_initial_state: _Optional[bool] = ...) -> None: ...

class WatchAdaptersResponse(_message.Message):
    __slots__ = ("type", "adapter", "sequence")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    type: AdapterEventType
    adapter: _common_pb2.Adapter
    sequence: int
    def __init__(self, type: _Optional[_Union[AdapterEventType, str]] = ..., adapter: _Optional[_Union[_common_pb2.Adapter, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "version", "file_name", "offset", "chunk_size")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    file_name: str
    offset: int
    chunk_size: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., file_name: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class DownloadAdapterResponse(_message.Message):
    __slots__ = ("file_start", "chunk")
    FILE_START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    file_start: DownloadFileStart
    chunk: _common_pb2.FileChunk
    def __init__(self, file_start: _Optional[_Union[DownloadFileStart, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.FileChunk, _Mapping]] = ...) -> None: ...

class DownloadFileStart(_message.Message):
    __slots__ = ("adapter", "file")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.Adapter
    file: _common_pb2.FileInfo
    def __init__(self, adapter: _Optional[_Union[_common_pb2.Adapter, _Mapping]] = ..., file: _Optional[_Union[_common_pb2.FileInfo, _Mapping]] = ...) -> None: ...

class ModuleShape(_message.Message):
    __slots__ = ("module", "in_features", "out_features")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    module: str
    in_features: int
    out_features: int
    def __init__(self, module: _Optional[str] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ...) -> None: ...

class BaseModel(_message.Message):
    __slots__ = ("base_model_id", "architecture", "num_layers", "hidden_size", "vocab_size", "modules", "create_time")
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    base_model_id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    modules: _containers.RepeatedCompositeFieldContainer[ModuleShape]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, base_model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., modules: _Optional[_Iterable[_Union[ModuleShape, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterBaseModelRequest(_message.Message):
    __slots__ = ("base_model_id", "config_json")
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    base_model_id: str
    config_json: str
    def __init__(self, base_model_id: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class RegisterBaseModelResponse(_message.Message):
    __slots__ = ("base_model",)
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    base_model: BaseModel
    def __init__(self, base_model: _Optional[_Union[BaseModel, _Mapping]] = ...) -> None: ...

class GetBaseModelRequest(_message.Message):
    __slots__ = ("base_model_id",)
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    base_model_id: str
    def __init__(self, base_model_id: _Optional[str] = ...) -> None: ...

class GetBaseModelResponse(_message.Message):
    __slots__ = ("base_model",)
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    base_model: BaseModel
    def __init__(self, base_model: _Optional[_Union[BaseModel, _Mapping]] = ...) -> None: ...
