from copl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreferenceRecord(_message.Message):
    __slots__ = ("user_id", "prompt", "chosen", "rejected", "group", "controversial", "created_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CONTROVERSIAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    prompt: str
    chosen: str
    rejected: str
    group: str
    controversial: bool
    created_at: str
    def __init__(self, user_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., group: _Optional[str] = ..., controversial: _Optional[bool] = ..., created_at: _Optional[str] = ...) -> None: ...

class AddPreferencesRequest(_message.Message):
    __slots__ = ("records", "skip_invalid")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_INVALID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[PreferenceRecord]
    skip_invalid: bool
    def __init__(self, records: _Optional[_Iterable[_Union[PreferenceRecord, _Mapping]]] = ..., skip_invalid: _Optional[bool] = ...) -> None: ...

class RejectedRecord(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AddPreferencesResponse(_message.Message):
    __slots__ = ("inserted", "duplicates", "rejected")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    duplicates: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedRecord]
    def __init__(self, inserted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedRecord, _Mapping]]] = ...) -> None: ...

class UserQuery(_message.Message):
    __slots__ = ("user_id", "context")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.PreferencePair]
    def __init__(self, user_id: _Optional[str] = ..., context: _Optional[_Iterable[_Union[_common_pb2.PreferencePair, _Mapping]]] = ...) -> None: ...

class GetUserEmbeddingRequest(_message.Message):
    __slots__ = ("users", "release_id", "require_known")
    USERS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_KNOWN_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[UserQuery]
    release_id: str
    require_known: bool
    def __init__(self, users: _Optional[_Iterable[_Union[UserQuery, _Mapping]]] = ..., release_id: _Optional[str] = ..., require_known: _Optional[bool] = ...) -> None: ...

class UserEmbedding(_message.Message):
    __slots__ = ("user_id", "vector", "source")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    source: _common_pb2.EmbeddingSource
    def __init__(self, user_id: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., source: _Optional[_Union[_common_pb2.EmbeddingSource, str]] = ...) -> None: ...

class GetUserEmbeddingResponse(_message.Message):
    __slots__ = ("embeddings", "release_id")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[UserEmbedding]
    release_id: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[UserEmbedding, _Mapping]]] = ..., release_id: _Optional[str] = ...) -> None: ...
