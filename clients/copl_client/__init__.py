"""Python client of the CoPL graph and reward services: light (grpcio, protobuf, the `copl.v1` stubs; tqdm
and numpy optional), sync (`Client`) and asyncio (`AsyncClient`).

```
from copl_client import Client
with Client(reward="grpc://127.0.0.1:50052", graph="grpc://127.0.0.1:50051") as client:
    print(client.score("alice", "Explain TLS.", ["short answer", "long answer"]))
```
"""
from copl_client.aio import AsyncClient
from copl_client.endpoints import TLSConfig
from copl_client.errors import (CoplError, DeadlineExceeded, InvalidArgument, InvalidRecords, NotFound,
                                PermissionDenied, ReleaseMismatch, ResourceExhausted, ServerError, Unauthenticated,
                                Unavailable)
from copl_client.jsonl import FileJobSummary, JobFileError
from copl_client.results import (AddResult, EmbeddingSource, ItemError, ItemResult, Pair, Preference, ReleaseInfo,
                                 ReloadResult, ScoreItem, Scores, UserEmbedding)
from copl_client.retry import RetryPolicy
from copl_client.sync import Client

__all__ = [
    "AddResult", "AsyncClient", "Client", "CoplError", "DeadlineExceeded", "EmbeddingSource", "FileJobSummary",
    "InvalidArgument", "InvalidRecords", "ItemError", "ItemResult", "JobFileError", "NotFound", "Pair",
    "PermissionDenied", "Preference", "ReleaseInfo", "ReleaseMismatch", "ReloadResult", "ResourceExhausted",
    "RetryPolicy", "ScoreItem", "Scores", "ServerError", "TLSConfig", "Unauthenticated", "Unavailable",
    "UserEmbedding",
]
