"""What the server tells its operators: Prometheus metrics (per-server registry, HTTP
exporter), OpenTelemetry traces (OTLP, when configured), JSON log lines carrying request ids,
and a worker pool that counts its queue."""
from __future__ import annotations

from colgrid_server.observability._context import caller, request_id
from colgrid_server.observability._logs import JsonFormatter, configure_logging
from colgrid_server.observability._metrics import Metrics, MetricsInterceptor
from colgrid_server.observability._pool import WorkerPool
from colgrid_server.observability._tracing import Tracing

__all__ = ["JsonFormatter", "Metrics", "MetricsInterceptor", "Tracing", "WorkerPool", "caller", "configure_logging",
           "request_id"]
