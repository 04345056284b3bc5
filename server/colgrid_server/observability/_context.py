"""Per-call values for log lines, set by the server's interceptors (each call runs in its own
contextvars context; WorkerPool carries it onto worker threads)."""
from __future__ import annotations

import contextvars

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The name of the API key the call authenticated with ("-": none, or auth is off).
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="-")
