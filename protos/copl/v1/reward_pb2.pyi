from copl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UserEmbeddingInput(_message.Message):
    __slots__ = ("vector", "release_id", "source")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    release_id: str
    source: _common_pb2.EmbeddingSource
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., release_id: _Optional[str] = ..., source: _Optional[_Union[_common_pb2.EmbeddingSource, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "embedding", "prompt", "responses", "request_id", "context", "require_known")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_KNOWN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    embedding: UserEmbeddingInput
    prompt: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    context: _containers.RepeatedCompositeFieldContainer[_common_pb2.PreferencePair]
    require_known: bool
    def __init__(self, user_id: _Optional[str] = ..., embedding: _Optional[_Union[UserEmbeddingInput, _Mapping]] = ..., prompt: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., context: _Optional[_Iterable[_Union[_common_pb2.PreferencePair, _Mapping]]] = ..., require_known: _Optional[bool] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "release_id", "embedding_source", "request_id", "error")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    release_id: str
    embedding_source: _common_pb2.EmbeddingSource
    request_id: str
    error: ItemError
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., release_id: _Optional[str] = ..., embedding_source: _Optional[_Union[_common_pb2.EmbeddingSource, str]] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...
