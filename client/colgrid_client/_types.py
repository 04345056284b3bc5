"""The SDK's values: frozen dataclasses with no protobuf in sight (`_convert` builds them).

Everything here is pure standard library so that `import colgrid_client` stays light; the one
numpy touch point, `Matrix.to_numpy`, imports numpy only when called.
"""
from __future__ import annotations

import enum
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy

Span = tuple[int, int]


@dataclass(frozen=True)
class Matrix:
    """A (rows x dim) float32 matrix: one multi-vector, one row per token.

    `data` is row-major float32 in native byte order. `tokens` holds one display string per row
    and `spans` one character span `(start, end)` per row (None where a row has none); both are
    empty for vectors computed elsewhere.
    """

    rows: int
    dim: int
    data: array = field(repr=False, hash=False)
    tokens: tuple[str, ...] = ()
    spans: tuple[Span | None, ...] = ()

    def __post_init__(self) -> None:
        if self.data.typecode != "f":
            raise TypeError(f"Matrix data must be array('f'), got array({self.data.typecode!r})")
        if self.rows < 0 or self.dim < 0:
            raise ValueError(f"Matrix shape must be non-negative, got ({self.rows}, {self.dim})")
        if len(self.data) != self.rows * self.dim:
            raise ValueError(f"Matrix of shape ({self.rows}, {self.dim}) needs "
                             f"{self.rows * self.dim} values, got {len(self.data)}")
        for name, values in (("tokens", self.tokens), ("spans", self.spans)):
            if values and len(values) != self.rows:
                raise ValueError(f"Matrix has {self.rows} rows but {len(values)} {name}")

    @classmethod
    def from_rows(cls, rows: Any, *, tokens: tuple[str, ...] = (),
                  spans: tuple[Span | None, ...] = ()) -> Matrix:
        """Build from a list of equal-length rows, or anything with `.tolist()` (numpy, torch)."""
        if isinstance(rows, Matrix):
            return rows
        if hasattr(rows, "tolist"):
            rows = rows.tolist()
        rows = [list(row) for row in rows]
        dim = len(rows[0]) if rows else 0
        for i, row in enumerate(rows):
            if len(row) != dim:
                raise ValueError(f"all rows must have the same length: row 0 has {dim} values, "
                                 f"row {i} has {len(row)}")
        data = array("f", (float(v) for row in rows for v in row))
        return cls(len(rows), dim, data, tuple(tokens), tuple(spans))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    def __len__(self) -> int:
        return self.rows

    @overload
    def __getitem__(self, index: int) -> list[float]: ...
    @overload
    def __getitem__(self, index: slice) -> list[list[float]]: ...

    def __getitem__(self, index: int | slice) -> list[float] | list[list[float]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.rows))]
        if index < 0:
            index += self.rows
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} out of range for a matrix of {self.rows} rows")
        return self.data[index * self.dim:(index + 1) * self.dim].tolist()

    def __iter__(self) -> Iterator[list[float]]:
        return (self[i] for i in range(self.rows))

    def tolist(self) -> list[list[float]]:
        return [self[i] for i in range(self.rows)]

    def to_numpy(self) -> numpy.ndarray:
        """A writable (rows, dim) float32 numpy copy. numpy is optional: imported only here."""
        try:
            import numpy as np
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("Matrix.to_numpy() needs numpy: pip install numpy") from exc
        return np.array(memoryview(self.data), dtype=np.float32).reshape(self.rows, self.dim)


@dataclass(frozen=True)
class PatchRef:
    """A patch of an image document (page): its cell in the patch grid and its pixel box
    (x0, y0, x1, y1, end-exclusive) on the stored page image."""

    row: int
    col: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TokenMatch:
    """How one query token matched inside one hit: its best document token and the score share.
    For image documents, `patch` is the patch the matched vector stands for and `pooled` the
    other patches of a pooled vector."""

    query_index: int
    query_token: str
    doc_token_index: int
    doc_token: str
    start: int          # character span of the document token, [start, end); -1 if none
    end: int
    similarity: float   # <q, d>: this query token's contribution to the hit's score
    share: float        # similarity / score
    patch: PatchRef | None = None
    pooled: tuple[PatchRef, ...] = ()

    @property
    def contribution(self) -> float:
        return self.similarity


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    rank: int                                   # 1-based
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    version: str = ""                           # the index version that scored this hit
    explanation: tuple[TokenMatch, ...] = ()    # empty unless explain=True
    kind: str = "text"                          # "text" or "image" (an image or a PDF page)


@dataclass(frozen=True)
class SearchStats:
    encode_ms: float = 0.0
    candidates_ms: float = 0.0
    maxsim_ms: float = 0.0
    total_ms: float = 0.0
    candidates: int = 0        # documents scored exactly
    query_tokens: int = 0


@dataclass(frozen=True)
class SearchResult:
    """One answer. Every hit comes from `version`: a request never mixes index versions.
    `role` says which rollout pointer answered ("stable" or "canary"), `generation` the rollout
    generation the server was routing by (both empty/0 from servers that do not say)."""

    index: str
    version: str
    encoder_id: str
    hits: tuple[Hit, ...]
    stats: SearchStats
    request_id: str
    generation: int = 0
    role: str = ""

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, index: int) -> Hit:
        return self.hits[index]


@dataclass(frozen=True)
class Explanation:
    """Why one document scored what it did for a query (see `Client.explain`).

    `matches` has one TokenMatch per query token, as a search hit's explanation. For an image
    document (`kind == "image"`), `grid` is the patch grid (rows, cols) and `patch_scores[r][c]`
    the score of patch cell (r, c): its similarity with the chosen `query_token`, or with every
    query token summed (query_token None); a pooled vector gives each of its patches its own
    score. `width` x `height` is the page image's size and `heatmap_png` the rendered heatmap
    (when asked for with render=True). Text documents have no grid, scores or PNG."""

    index: str
    version: str
    doc_id: str
    score: float
    matches: tuple[TokenMatch, ...]
    kind: str = "text"
    grid: tuple[int, int] | None = None
    patch_scores: list[list[float]] = field(default_factory=list, hash=False, repr=False)
    width: int = 0
    height: int = 0
    heatmap_png: bytes = field(default=b"", repr=False)
    encoder_id: str = ""
    query_token: int | None = None

    def save_heatmap(self, path: str | PathLike[str]) -> Path:
        """Write the heatmap PNG to `path` and return it; ValueError when there is none."""
        if not self.heatmap_png:
            why = "it is a text document" if self.kind != "image" else "explain was called without render=True"
            raise ValueError(f"no heatmap for {self.doc_id!r}: {why}")
        target = Path(path)
        target.write_bytes(self.heatmap_png)
        return target


class VersionState(enum.StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"
    RETIRED = "RETIRED"


@dataclass(frozen=True)
class VersionEvaluation:
    """One version's scores on a judged query set (see `Client.evaluate`): nDCG@10 (linear
    gains), recall@k, MRR@10 as means over the queries, and search latency percentiles."""

    version: str
    query_set: str
    queries: int = 0
    ndcg_at_10: float = 0.0
    recall_at_k: float = 0.0
    k: int = 0                 # the recall cut-off
    mrr_at_10: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p99_ms: float = 0.0
    evaluated_at: str = ""     # RFC 3339, UTC
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)  # every value by name

    @property
    def judged_missing(self) -> int:
        """(query, relevant document) pairs whose document the version does not contain."""
        return int(self.metrics.get("judged_missing", 0))


@dataclass(frozen=True)
class EvalQuery:
    """A judged query for `Client.evaluate`: text (or `query_vectors`) and its relevance
    judgements {doc id: gain}; a gain > 0 marks a relevant document."""

    query_id: str
    query: str = ""
    relevant: Mapping[str, float] = field(default_factory=dict, hash=False)
    query_vectors: Any = field(default=None, hash=False, compare=False, repr=False)


@dataclass(frozen=True)
class PromotePolicy:
    """Rules `promote` must pass (None: not checked). A refusal raises FailedPreconditionError
    whose error_metadata["rule"] names the rule that failed, and changes nothing.

    max_ndcg_drop: canary nDCG@10 >= stable nDCG@10 - this, on a query set both were evaluated
    on (`evaluate(..., record=True)`). min_shadow_overlap: mean shadow overlap@k of the canary
    against stable >= this. min_shadow_compared: at least this many shadow comparisons."""

    max_ndcg_drop: float | None = None
    min_shadow_overlap: float | None = None
    min_shadow_compared: int | None = None


@dataclass(frozen=True)
class Version:
    index: str
    version: str
    state: VersionState
    encoder_id: str = ""
    encoder_kind: str = ""
    dim: int = 0
    documents: int = 0
    tokens: int = 0
    storage_uri: str = ""
    build_params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    manifest_sha256: str = ""
    created_at: str = ""       # RFC 3339, UTC
    updated_at: str = ""
    error: str = ""            # why it FAILED
    evaluations: tuple[VersionEvaluation, ...] = ()  # newest first


@dataclass(frozen=True)
class Rollout:
    """Which versions an index alias serves. Pointers are None when unset."""

    index: str
    stable: str | None = None
    canary: str | None = None
    canary_percent: int = 0
    shadow: str | None = None
    shadow_percent: int = 0
    previous_stable: str | None = None
    generation: int = 0
    updated_at: str = ""


@dataclass(frozen=True)
class IndexInfo:
    name: str
    created_at: str = ""
    rollout: Rollout | None = None
    versions: int = 0
    loaded: bool = False       # the answering server holds the stable version in memory


# --- rollouts (values of `colgrid_client.rollout`) ---------------------------------------------

@dataclass(frozen=True)
class ReplicaAck:
    """One server sharing the registry, as of its last heartbeat, for one index's rollout."""

    replica_id: str
    address: str
    generation: int | None     # the generation of this index it serves (None: it serves none)
    last_seen: str             # RFC 3339, UTC
    live: bool                 # heartbeat recent enough to be waited for
    acknowledged: bool         # serves the rollout's generation, or a later one


@dataclass(frozen=True)
class ShadowStats:
    """Shadow comparisons of one (primary, shadow) version pair on the answering server."""

    primary: str
    shadow: str
    sampled: int = 0           # requests picked for shadowing
    compared: int = 0
    errors: int = 0            # failed shadow searches (never seen by callers)
    dropped: int = 0           # shed because the shadow queue was full
    mean_overlap: float = 0.0  # overlap@k with the answer returned
    mean_rank_correlation: float = 0.0  # rank-biased overlap, p = 0.9
    primary_p50_ms: float = 0.0
    primary_p95_ms: float = 0.0
    shadow_p50_ms: float = 0.0
    shadow_p95_ms: float = 0.0
    last_error: str = ""


@dataclass(frozen=True)
class LoadError:
    """A version the answering server could not load; it kept serving its previous routes."""

    version: str
    check: str                 # ready | checksum | encoder | warm-up | load
    message: str
    generation: int
    at: str


@dataclass(frozen=True)
class ServingVersion:
    """A version held in memory by the answering server."""

    version: str
    roles: tuple[str, ...]     # stable / canary / shadow; empty while draining
    in_flight: int             # requests and streams reading it now
    draining: bool             # no longer routed; unloaded once in_flight reaches 0


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout as one server sees it: the registry's pointers, which replicas serve them,
    and this server's shadow statistics, load errors and loaded versions.

    After a change with `wait_for_replicas`, `pending_replicas` lists the live replicas that
    had not reported the new generation when the wait ended (empty: all caught up)."""

    rollout: Rollout
    replicas: tuple[ReplicaAck, ...] = ()
    pending_replicas: tuple[str, ...] = ()
    shadow_stats: tuple[ShadowStats, ...] = ()
    load_errors: tuple[LoadError, ...] = ()
    replica_id: str = ""
    served_generation: int | None = None
    versions: tuple[ServingVersion, ...] = ()

    @property
    def acknowledged(self) -> bool:
        """Every live replica serves this generation."""
        return not self.pending_replicas


@dataclass(frozen=True)
class AuditEntry:
    """One rollout change: who, when, why, and the pointers before and after."""

    id: int
    index: str
    at: str
    actor: str
    action: str
    reason: str
    before: Rollout
    after: Rollout


# --- ingestion ---------------------------------------------------------------------------------

# File suffixes `IngestDoc.file` reads, and as what.
INGEST_TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
INGEST_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})
INGEST_PDF_SUFFIXES = frozenset({".pdf"})


@dataclass(frozen=True)
class IngestDoc:
    """One document for `Client.ingest`; build it with `IngestDoc.text`, `.image`, `.pdf`,
    `.file` or `.vectors`. A PDF becomes one document per page, "<id>#p<page>" (1-based).
    `content` is the text (str), the image or PDF bytes, or the multi-vector (a Matrix, a list
    of rows, or a numpy/torch matrix). `metadata` (JSON values) is stored with the document;
    `filename` names it in errors and is kept in its metadata."""

    id: str
    kind: str                  # text | image | pdf | vectors
    content: Any = field(repr=False, compare=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    filename: str = ""

    @classmethod
    def text(cls, id: str, text: str, metadata: Mapping[str, Any] | None = None, *,
             filename: str = "") -> IngestDoc:
        return cls(id, "text", text, dict(metadata or {}), filename)

    @classmethod
    def image(cls, id: str, data: bytes, metadata: Mapping[str, Any] | None = None, *,
              filename: str = "") -> IngestDoc:
        """PNG, JPEG, TIFF (every frame a page) or WebP bytes."""
        return cls(id, "image", bytes(data), dict(metadata or {}), filename)

    @classmethod
    def pdf(cls, id: str, data: bytes, metadata: Mapping[str, Any] | None = None, *,
            filename: str = "") -> IngestDoc:
        return cls(id, "pdf", bytes(data), dict(metadata or {}), filename)

    @classmethod
    def vectors(cls, id: str, matrix: Any, metadata: Mapping[str, Any] | None = None) -> IngestDoc:
        """A multi-vector computed elsewhere (ingest with external_vectors=True)."""
        return cls(id, "vectors", matrix, dict(metadata or {}))

    @classmethod
    def file(cls, path: str | PathLike[str], id: str | None = None,
             metadata: Mapping[str, Any] | None = None) -> IngestDoc:
        """A file read by its suffix: .txt/.md text (UTF-8), an image, or a PDF. `id` defaults to
        the file's name. ValueError for any other suffix."""
        path = Path(path)
        suffix = path.suffix.lower()
        doc_id = path.name if id is None else id
        if suffix in INGEST_TEXT_SUFFIXES:
            return cls.text(doc_id, path.read_bytes().decode("utf-8-sig"), metadata, filename=path.name)
        if suffix in INGEST_IMAGE_SUFFIXES:
            return cls.image(doc_id, path.read_bytes(), metadata, filename=path.name)
        if suffix in INGEST_PDF_SUFFIXES:
            return cls.pdf(doc_id, path.read_bytes(), metadata, filename=path.name)
        supported = ", ".join(sorted(INGEST_TEXT_SUFFIXES | INGEST_IMAGE_SUFFIXES | INGEST_PDF_SUFFIXES))
        raise ValueError(f"{path}: {suffix or 'no suffix'!r} files cannot be ingested; supported: {supported}")


@dataclass(frozen=True)
class IngestOptions:
    """How `Client.ingest` builds the version (IngestOptions in the proto)."""

    index: str
    encoder_id: str = ""       # "": the stable version's encoder, else the server's bundled one
    codec: str = "fp16"        # fp16 | int8 | residual4 | residual2 | entropy4 | entropy2
    activate: bool = False     # make the version stable when READY (an index's first: always)
    pool_factor: int = 1       # image documents: hierarchical token pooling (1: off)
    external_vectors: bool = False
    pdf_dpi: int = 0           # 0: the server's default
    n_centroids: int = 0       # 0: chosen from the token count
    actor: str = ""


@dataclass(frozen=True)
class IngestError:
    """A document the server could not index; the rest of the stream still was. `code` is
    stable: corrupt_image, image_too_large, pdf_truncated, pdf_encrypted, pdf_empty,
    pdf_too_many_pages, unsupported_type, unsupported_by_encoder, duplicate_id, invalid_document…"""

    document: str
    code: str
    message: str


@dataclass(frozen=True)
class IngestProgress:
    """One progress message: stage (receiving | encoding | clustering | writing | ready |
    failed), counts so far, the errors since the previous message, and on `ready` the version."""

    stage: str
    received: int = 0          # inputs seen (a PDF counts its pages once rendered)
    encoded: int = 0
    failed: int = 0
    errors: tuple[IngestError, ...] = ()
    elapsed_s: float = 0.0
    version: Version | None = None


@dataclass(frozen=True)
class IngestResult:
    """What `Client.ingest` built: the READY version, every refused document, and the counts
    (received == encoded + failed)."""

    version: Version
    errors: tuple[IngestError, ...] = ()
    received: int = 0
    encoded: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    progress_messages: int = 0
