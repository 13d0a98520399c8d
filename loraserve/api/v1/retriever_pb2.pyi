from loraserve.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoringMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_MODE_UNSPECIFIED: _ClassVar[ScoringMode]
    SCORING_MODE_CENTROID: _ClassVar[ScoringMode]
    SCORING_MODE_NEAREST_SAMPLE: _ClassVar[ScoringMode]
    SCORING_MODE_COMBINED: _ClassVar[ScoringMode]

class MixtureWeighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIXTURE_WEIGHTING_UNSPECIFIED: _ClassVar[MixtureWeighting]
    MIXTURE_WEIGHTING_SOFTMAX: _ClassVar[MixtureWeighting]
    MIXTURE_WEIGHTING_UNIFORM: _ClassVar[MixtureWeighting]
SCORING_MODE_UNSPECIFIED: ScoringMode
SCORING_MODE_CENTROID: ScoringMode
SCORING_MODE_NEAREST_SAMPLE: ScoringMode
SCORING_MODE_COMBINED: ScoringMode
MIXTURE_WEIGHTING_UNSPECIFIED: MixtureWeighting
MIXTURE_WEIGHTING_SOFTMAX: MixtureWeighting
MIXTURE_WEIGHTING_UNIFORM: MixtureWeighting

class RetrievalFilter(_message.Message):
    __slots__ = ("tags", "domain", "adapter_ids")
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    domain: str
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tags: _Optional[_Iterable[str]] = ..., domain: _Optional[str] = ..., adapter_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("prompts", "base_model", "top_k", "strategy", "filter", "scoring", "weighting", "temperature", "min_score")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    base_model: str
    top_k: int
    strategy: _common_pb2.CompositionStrategy
    filter: RetrievalFilter
    scoring: ScoringMode
    weighting: MixtureWeighting
    temperature: float
    min_score: float
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., base_model: _Optional[str] = ..., top_k: _Optional[int] = ..., strategy: _Optional[_Union[_common_pb2.CompositionStrategy, str]] = ..., filter: _Optional[_Union[RetrievalFilter, _Mapping]] = ..., scoring: _Optional[_Union[ScoringMode, str]] = ..., weighting: _Optional[_Union[MixtureWeighting, str]] = ..., temperature: _Optional[float] = ..., min_score: _Optional[float] = ...) -> None: ...

class ScoredAdapter(_message.Message):
    __slots__ = ("adapter_id", "version", "score", "centroid_score", "sample_score", "domain")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CENTROID_SCORE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SCORE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    score: float
    centroid_score: float
    sample_score: float
    domain: str
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., score: _Optional[float] = ..., centroid_score: _Optional[float] = ..., sample_score: _Optional[float] = ..., domain: _Optional[str] = ...) -> None: ...

class PromptPlan(_message.Message):
    __slots__ = ("prompt_index", "plan", "candidates", "truncated", "below_min_score")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    BELOW_MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    plan: _common_pb2.LoraPlan
    candidates: _containers.RepeatedCompositeFieldContainer[ScoredAdapter]
    truncated: bool
    below_min_score: bool
    def __init__(self, prompt_index: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.LoraPlan, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[ScoredAdapter, _Mapping]]] = ..., truncated: _Optional[bool] = ..., below_min_score: _Optional[bool] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("plans", "embedding_model")
    PLANS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[PromptPlan]
    embedding_model: str
    def __init__(self, plans: _Optional[_Iterable[_Union[PromptPlan, _Mapping]]] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("plan", "base_model")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.LoraPlan
    base_model: str
    def __init__(self, plan: _Optional[_Union[_common_pb2.LoraPlan, _Mapping]] = ..., base_model: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("replica_id", "address", "reason")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    reason: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("prompt", "base_model", "top_n", "filter", "scoring")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    base_model: str
    top_n: int
    filter: RetrievalFilter
    scoring: ScoringMode
    def __init__(self, prompt: _Optional[str] = ..., base_model: _Optional[str] = ..., top_n: _Optional[int] = ..., filter: _Optional[_Union[RetrievalFilter, _Mapping]] = ..., scoring: _Optional[_Union[ScoringMode, str]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("candidates", "embedding_model", "min_score", "truncated")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[ScoredAdapter]
    embedding_model: str
    min_score: float
    truncated: bool
    def __init__(self, candidates: _Optional[_Iterable[_Union[ScoredAdapter, _Mapping]]] = ..., embedding_model: _Optional[str] = ..., min_score: _Optional[float] = ..., truncated: _Optional[bool] = ...) -> None: ...
