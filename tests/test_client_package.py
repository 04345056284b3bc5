"""The client SDK as a package: light to import, and a curated public surface."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import colgrid_client

EXPORTED = [
    "__version__",
    "Client", "AsyncClient",
    "SearchResult", "Hit", "PatchRef", "TokenMatch", "Explanation", "SearchStats", "Matrix", "IndexInfo",
    "Rollout", "Version", "VersionState", "EvalQuery", "VersionEvaluation", "PromotePolicy",
    "IngestDoc", "IngestResult", "IngestProgress", "IngestError",
    "ColgridError", "InvalidArgumentError", "NotFoundError", "FailedPreconditionError",
    "ResourceExhaustedError", "UnavailableError", "DeadlineExceededError", "AbortedError",
    "PermissionDeniedError", "UnauthenticatedError", "InternalError", "FieldViolation",
    "ResourceInfo",
]

_PROBE = """
import json, sys
before = set(sys.modules)
import colgrid_client
print(json.dumps(sorted(set(sys.modules) - before)))
"""
# Third-party top-level packages `import colgrid_client` may load: grpcio (which itself pulls
# its sibling plugins and typing_extensions), grpcio-status, protobuf / googleapis protos.
_ALLOWED = ("colgrid_client", "grpc", "grpc_status", "grpc_health", "grpc_reflection",
            "grpc_tools", "google", "typing_extensions", "_cython_", "cython_runtime")


def _modules_loaded_by_import() -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True,
                         text=True, timeout=60)
    return json.loads(out.stdout)


def test_import_loads_only_grpc_protobuf_and_stdlib() -> None:
    loaded = {name.split(".")[0] for name in _modules_loaded_by_import()}
    third_party = loaded - set(sys.stdlib_module_names)
    assert {"colgrid_client", "grpc", "google"} <= third_party
    assert not {"torch", "numpy", "onnxruntime", "zarr", "colgrid_server"} & third_party
    assert [m for m in third_party if not m.startswith(_ALLOWED)] == []


def test_all_lists_exactly_the_public_api() -> None:
    assert sorted(colgrid_client.__all__) == sorted(EXPORTED)


def test_every_exported_name_is_importable_and_reports_the_public_module() -> None:
    for name in colgrid_client.__all__:
        member = getattr(colgrid_client, name)
        if name != "__version__":
            assert member.__module__ == "colgrid_client", name


def test_version_matches_the_installed_distribution() -> None:
    assert colgrid_client.__version__ == importlib.metadata.version("colgrid-client")


def test_errors_inherit_the_builtin_a_caller_expects() -> None:
    assert issubclass(colgrid_client.InvalidArgumentError, ValueError)
    assert issubclass(colgrid_client.NotFoundError, LookupError)
    assert issubclass(colgrid_client.DeadlineExceededError, TimeoutError)
    for name in colgrid_client.__all__:
        member = getattr(colgrid_client, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, colgrid_client.ColgridError), name
