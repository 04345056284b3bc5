"""colgrid client SDK: search, encode, registry and rollout calls against a colgrid server.

Light by design: importing it loads grpcio and protobuf only (never numpy, torch, onnxruntime).

    from colgrid_client import Client

    with Client("localhost:50051") as client:
        for hit in client.search("docs", "what is late interaction?", k=5, explain=True):
            print(hit.rank, hit.doc_id, hit.score)
        client.start_canary("docs", "v2", 10, reason="new corpus")  # then promote / rollback

The rollout (admin) methods return values defined in `colgrid_client.rollout`.
"""
from colgrid_client._async import AsyncClient
from colgrid_client._errors import (
    AbortedError, ColgridError, DeadlineExceededError, FailedPreconditionError, FieldViolation,
    InternalError, InvalidArgumentError, NotFoundError, PermissionDeniedError,
    ResourceExhaustedError, ResourceInfo, UnauthenticatedError, UnavailableError,
)
from colgrid_client._sync import Client
from colgrid_client._types import EvalQuery, PromotePolicy, VersionEvaluation
from colgrid_client._types import IngestDoc, IngestError, IngestProgress, IngestResult
from colgrid_client._types import Explanation
from colgrid_client._types import (
    Hit, IndexInfo, Matrix, PatchRef, Rollout, SearchResult, SearchStats, TokenMatch, Version, VersionState,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # clients
    "Client",
    "AsyncClient",
    # values
    "SearchResult",
    "Hit",
    "PatchRef",
    "TokenMatch",
    "Explanation",
    "SearchStats",
    "Matrix",
    "IndexInfo",
    "Rollout",
    "Version",
    "VersionState",
    "EvalQuery",
    "VersionEvaluation",
    "PromotePolicy",
    "IngestDoc",
    "IngestResult",
    "IngestProgress",
    "IngestError",
    # errors
    "ColgridError",
    "InvalidArgumentError",
    "NotFoundError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "AbortedError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "InternalError",
    "FieldViolation",
    "ResourceInfo",
]

# Public names report the public module, as httpx does, so reprs and docs never show _private.
for _name in __all__:
    if not _name.startswith("__"):
        setattr(globals()[_name], "__module__", "colgrid_client")
del _name
