import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompositionStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPOSITION_STRATEGY_UNSPECIFIED: _ClassVar[CompositionStrategy]
    COMPOSITION_STRATEGY_SELECTION: _ClassVar[CompositionStrategy]
    COMPOSITION_STRATEGY_MIXTURE: _ClassVar[CompositionStrategy]
    COMPOSITION_STRATEGY_FUSION: _ClassVar[CompositionStrategy]
    COMPOSITION_STRATEGY_GATE: _ClassVar[CompositionStrategy]

class AdapterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATUS_UNSPECIFIED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_PENDING: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_VALIDATING: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_EMBEDDING: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_READY: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_FAILED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_DELETED: _ClassVar[AdapterStatus]
COMPOSITION_STRATEGY_UNSPECIFIED: CompositionStrategy
COMPOSITION_STRATEGY_SELECTION: CompositionStrategy
COMPOSITION_STRATEGY_MIXTURE: CompositionStrategy
COMPOSITION_STRATEGY_FUSION: CompositionStrategy
COMPOSITION_STRATEGY_GATE: CompositionStrategy
ADAPTER_STATUS_UNSPECIFIED: AdapterStatus
ADAPTER_STATUS_PENDING: AdapterStatus
ADAPTER_STATUS_VALIDATING: AdapterStatus
ADAPTER_STATUS_EMBEDDING: AdapterStatus
ADAPTER_STATUS_READY: AdapterStatus
ADAPTER_STATUS_FAILED: AdapterStatus
ADAPTER_STATUS_DELETED: AdapterStatus

class AdapterRef(_message.Message):
    __slots__ = ("adapter_id", "version")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WeightedAdapter(_message.Message):
    __slots__ = ("adapter_id", "version", "weight")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    weight: float
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class LoraPlan(_message.Message):
    __slots__ = ("strategy", "adapters", "gate_id")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    GATE_ID_FIELD_NUMBER: _ClassVar[int]
    strategy: CompositionStrategy
    adapters: _containers.RepeatedCompositeFieldContainer[WeightedAdapter]
    gate_id: str
    def __init__(self, strategy: _Optional[_Union[CompositionStrategy, str]] = ..., adapters: _Optional[_Iterable[_Union[WeightedAdapter, _Mapping]]] = ..., gate_id: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    min_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., min_tokens: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class ModuleScale(_message.Message):
    __slots__ = ("module", "rank", "alpha", "scale")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    module: str
    rank: int
    alpha: float
    scale: float
    def __init__(self, module: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., scale: _Optional[float] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class AdapterMetadata(_message.Message):
    __slots__ = ("base_model", "rank", "lora_alpha", "target_modules", "module_scales", "use_rslora", "size_bytes", "sha256", "tags", "domain", "sample_inputs_count", "description", "files", "dtype")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MODULE_SCALES_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INPUTS_COUNT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    rank: int
    lora_alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    module_scales: _containers.RepeatedCompositeFieldContainer[ModuleScale]
    use_rslora: bool
    size_bytes: int
    sha256: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    domain: str
    sample_inputs_count: int
    description: str
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    dtype: str
    def __init__(self, base_model: _Optional[str] = ..., rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., module_scales: _Optional[_Iterable[_Union[ModuleScale, _Mapping]]] = ..., use_rslora: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., domain: _Optional[str] = ..., sample_inputs_count: _Optional[int] = ..., description: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("adapter_id", "version", "status", "failure_reason", "metadata", "create_time", "update_time")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    status: AdapterStatus
    failure_reason: str
    metadata: AdapterMetadata
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[_Union[AdapterStatus, str]] = ..., failure_reason: _Optional[str] = ..., metadata: _Optional[_Union[AdapterMetadata, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file_name", "offset", "data")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    offset: int
    data: bytes
    def __init__(self, file_name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
