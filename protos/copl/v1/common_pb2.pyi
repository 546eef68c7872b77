from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EmbeddingSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_SOURCE_UNSPECIFIED: _ClassVar[EmbeddingSource]
    TRAINED: _ClassVar[EmbeddingSource]
    ADAPTED: _ClassVar[EmbeddingSource]
    DEFAULT: _ClassVar[EmbeddingSource]
EMBEDDING_SOURCE_UNSPECIFIED: EmbeddingSource
TRAINED: EmbeddingSource
ADAPTED: EmbeddingSource
DEFAULT: EmbeddingSource

class PreferencePair(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ...) -> None: ...

class ReleaseInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseInfo(_message.Message):
    __slots__ = ("release_id", "created_at", "backbone", "embedding_dim", "num_users", "metrics_json", "snapshot_time", "serving_release_ids")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_USERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TIME_FIELD_NUMBER: _ClassVar[int]
    SERVING_RELEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    created_at: str
    backbone: str
    embedding_dim: int
    num_users: int
    metrics_json: str
    snapshot_time: str
    serving_release_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, release_id: _Optional[str] = ..., created_at: _Optional[str] = ..., backbone: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., num_users: _Optional[int] = ..., metrics_json: _Optional[str] = ..., snapshot_time: _Optional[str] = ..., serving_release_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("release_id",)
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    def __init__(self, release_id: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("release_id", "swapped", "previous_release_id")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    swapped: bool
    previous_release_id: str
    def __init__(self, release_id: _Optional[str] = ..., swapped: _Optional[bool] = ..., previous_release_id: _Optional[str] = ...) -> None: ...
