"""One version's scores on one query set, as stored in the registry (metric name -> value)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from colgrid_registry import EvaluationRecord
from colgrid_server.evaluation._metrics import MRR_CUTOFF, NDCG_CUTOFF

# Metric names as stored (`recall@<k>` carries its cut-off in the name).
NDCG = f"ndcg@{NDCG_CUTOFF}"
MRR = f"mrr@{MRR_CUTOFF}"
LATENCY_P50, LATENCY_P95, LATENCY_P99 = "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"
QUERIES = "queries"
JUDGED_MISSING = "judged_missing"  # (query, relevant document) pairs the version does not contain
_RECALL = re.compile(r"recall@(\d+)")


def recall_name(k: int) -> str:
    return f"recall@{k}"


@dataclass(frozen=True)
class Evaluation:
    """Scores of `version` on `query_set`. `metrics` holds every value by name (what the registry
    stores); the properties read the standard ones, 0 where a stored evaluation lacks them.
    `evaluated_at` is when it was recorded (or run, when not recorded)."""

    index: str
    version: str
    query_set: str
    metrics: Mapping[str, float] = field(hash=False)
    evaluated_at: datetime | None = None
    recorded: bool = False

    @classmethod
    def from_record(cls, record: EvaluationRecord) -> Evaluation:
        return cls(record.index, record.version, record.query_set, dict(record.metrics), record.at, recorded=True)

    def _get(self, name: str) -> float:
        return float(self.metrics.get(name, 0.0))

    @property
    def queries(self) -> int:
        return int(self._get(QUERIES))

    @property
    def k(self) -> int:
        """The recall cut-off (0 when no recall@k was stored)."""
        cutoffs = sorted(int(m.group(1)) for name in self.metrics if (m := _RECALL.fullmatch(name)))
        return cutoffs[0] if cutoffs else 0

    @property
    def has_ndcg(self) -> bool:
        return NDCG in self.metrics

    @property
    def ndcg_at_10(self) -> float:
        return self._get(NDCG)

    @property
    def recall_at_k(self) -> float:
        return self._get(recall_name(self.k)) if self.k else 0.0

    @property
    def mrr_at_10(self) -> float:
        return self._get(MRR)

    @property
    def latency_p50_ms(self) -> float:
        return self._get(LATENCY_P50)

    @property
    def latency_p95_ms(self) -> float:
        return self._get(LATENCY_P95)

    @property
    def latency_p99_ms(self) -> float:
        return self._get(LATENCY_P99)

    @property
    def judged_missing(self) -> int:
        return int(self._get(JUDGED_MISSING))
