"""Server settings, read once into a frozen object: defaults < COLGRID_* environment < flags."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from colgrid_server.errors import InvalidArgument

ENV_PREFIX = "COLGRID_"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    registry_url: str = ""            # empty: SQLite file <data_dir>/registry.db
    host: str = "localhost"
    port: int = 50051
    # Request limits: anything larger is INVALID_ARGUMENT / RESOURCE_EXHAUSTED, never a crash.
    max_query_chars: int = 4096
    max_k: int = 1000
    max_encode_texts: int = 256
    max_message_bytes: int = 64 * 1024 * 1024
    # Work runs on a thread pool so the event loop keeps serving while torch/ORT compute.
    worker_threads: int = 4
    encoder_threads: int = 0          # 0: onnxruntime's default
    device: str = "auto"              # auto | cpu | cuda
    # CPU: keep an int8 copy of each version's tokens (x1.5 token memory) for the exact MaxSim
    # screen (bench/README.md "P2"): same results, about 3x faster scoring of candidates.
    int8_screen: bool = False
    registry_poll_seconds: float = 2.0
    replica_id: str = ""              # empty: host:port+pid (how this server reports to the registry)
    # Replicas silent this long (killed without leaving) are dropped from the replica list; 0: never.
    replica_forget_after_seconds: float = 3600.0
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"          # text | json (one JSON object per line, with request ids)
    # Security: TLS from files; API keys (hashed, with roles) from a JSON file. Empty: off.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""           # set: mutual TLS, clients must present a cert signed by it
    api_keys_file: str = ""
    # Observability: Prometheus metrics over HTTP on this port (0: off).
    metrics_port: int = 0
    metrics_host: str = "localhost"
    # Traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317; empty: off).
    otel_endpoint: str = ""
    otel_service_name: str = "colgrid"
    otel_sample_ratio: float = 1.0    # of traces the server starts; a caller's sampled trace is always kept
    # This share of searches is run again exhaustively in the background, and recall@k of the
    # answer that went out against it is exported (colgrid_sampled_recall); 0: off.
    recall_sample_rate: float = 0.0
    # Backpressure: requests waiting for a worker beyond this are RESOURCE_EXHAUSTED.
    max_queued_requests: int = 256
    # Ingestion limits (per ingest stream / build input).
    max_ingest_documents: int = 100_000
    max_image_pixels: int = 50_000_000
    max_pdf_pages: int = 2_000
    pdf_dpi: int = 144
    # Object storage: versions under this URL (e.g. s3://bucket/prefix) instead of data_dir.
    storage_url: str = ""
    storage_cache_dir: str = ""       # empty: <data_dir>/cache
    # Budget of that cache: least recently used copies not loaded here are removed past it (0: no limit).
    storage_cache_max_gb: float = 0.0

    @property
    def registry_location(self) -> str:
        return self.registry_url or str(self.data_dir / "registry.db")

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from the environment, then apply non-None overrides (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, type(getattr(cls(), f.name)))
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = _coerce(key, value, type(getattr(cls(), key)))
        settings = replace(cls(), **values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port {self.port} is out of range 0..65535", field="port")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"device must be auto, cpu or cuda, not {self.device!r}", field="device")
        if self.log_format not in ("text", "json"):
            raise InvalidArgument(f"log_format must be text or json, not {self.log_format!r}", field="log_format")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("tls_cert and tls_key must be set together", field="tls_cert")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("tls_client_ca (mutual TLS) needs tls_cert and tls_key", field="tls_client_ca")
        for name in ("max_queued_requests", "max_ingest_documents", "max_image_pixels", "max_pdf_pages", "pdf_dpi"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1", field=name)
        if self.worker_threads < 1:
            raise InvalidArgument("worker_threads must be at least 1", field="worker_threads")
        if self.replica_forget_after_seconds < 0:
            raise InvalidArgument("replica_forget_after_seconds must be 0 (never) or a number of seconds",
                                  field="replica_forget_after_seconds")
        for name in ("otel_sample_ratio", "recall_sample_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidArgument(f"{name} must be within [0, 1], not {getattr(self, name)}", field=name)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, kind):
        return value
    try:
        if kind is bool:
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        if kind is Path:
            return Path(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"setting {name}: cannot read {value!r} as {kind.__name__}", field=name) from exc
