"""The blocking client."""
from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from colgrid_client import _base as base
from colgrid_client._errors import from_rpc_error
from colgrid_client import _convert as convert
from colgrid_client._types import AuditEntry, IndexInfo, Matrix, RolloutStatus, SearchResult, Version
from colgrid_client._types import EvalQuery, PromotePolicy, VersionEvaluation
from colgrid_client._types import IngestDoc, IngestOptions, IngestProgress, IngestResult
from colgrid_client._types import Explanation

T = TypeVar("T")


class Client:
    """A blocking colgrid client over one gRPC channel. Thread-safe; use one per process.

    `timeout` is the default deadline in seconds for each call (None: no deadline); it bounds
    the whole call, retries included, and for `search_stream` the whole stream. Calls failing
    with UNAVAILABLE are retried up to `retries` times with exponential backoff (`backoff`
    seconds, doubled each time, jittered); no other failure is retried, and streams are not.
    `options` are grpc channel options, added to ours (64 MiB message limits).

    Security: `api_key` is sent as `authorization: Bearer <key>` on every call, streams
    included. `root_certificates` (the CA that signed the server's certificate) makes a TLS
    channel; `private_key` + `certificate_chain` add this client's certificate for mutual TLS.
    Each is PEM bytes, PEM text, or a file path. `credentials` (grpc.ChannelCredentials) is the
    alternative for anything else, e.g. grpc.ssl_channel_credentials() for the system's CAs.
    """

    def __init__(self, target: str = base.DEFAULT_TARGET, *, api_key: str | None = None,
                 root_certificates: base.PemSource | None = None, private_key: base.PemSource | None = None,
                 certificate_chain: base.PemSource | None = None, timeout: float | None = 30.0,
                 retries: int = 3, backoff: float = 0.1,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] | None = None) -> None:
        self._retry = base.RetryPolicy(retries=retries, backoff=backoff)
        self._timeout = timeout
        credentials = base.channel_credentials(credentials, root_certificates, private_key, certificate_chain)
        self._channel = base.sync_channel(target, credentials, base.channel_options(options), api_key)
        self._stubs = base.Stubs.on(self._channel)
        self.target = target

    # --- search --------------------------------------------------------------------------------

    def search(self, index: str, query: str = "", k: int = 10, *, explain: bool = False,
               nprobe: int = 0, n_candidates: int = 0, routing_key: str = "",
               query_vectors: Any = None, exhaustive: bool = False,
               filter: Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
               doc_ids: Sequence[str] | None = None,
               timeout: float | None = None) -> SearchResult:
        """Top-k documents of `index` (an alias) for `query` text, or for `query_vectors`
        (a Matrix, list of rows, or numpy/torch matrix) computed elsewhere. 0 = server default.

        filter: only documents whose metadata satisfies every entry:
        {"lang": "en"} (equals), {"tags": ["a", "b"]} (one of; a list field matches on any
        element), {"year": {"gte": 2020, "lt": 2025}} (numeric range), {"draft": {"not": True}}
        (negation; documents without the field pass), {"source.site": ...} (nested keys).
        doc_ids: only these documents."""
        return self._unary(base.search(index, query, k, explain, nprobe, n_candidates,
                                       routing_key, query_vectors, exhaustive, filter, doc_ids), timeout)

    def search_stream(self, index: str, queries: Iterable[str | Mapping[str, Any]], *,
                      k: int = 10, explain: bool = False, nprobe: int = 0, n_candidates: int = 0,
                      routing_key: str = "", exhaustive: bool = False,
                      filter: Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
                      doc_ids: Sequence[str] | None = None,
                      timeout: float | None = None) -> Iterator[SearchResult]:
        """Many queries over one bidirectional stream; results come back in query order.

        A query is a string, or a dict overriding the keyword knobs for that query (keys:
        query, query_vectors, k, explain, nprobe, n_candidates, routing_key, exhaustive,
        filter, doc_ids, request_id). The server resolves the alias once, so every result has the same version.
        Each result's `request_id` is the one given, else "<stream id>-<position>".
        """
        stream = base.SearchStream(index, dict(k=k, explain=explain, nprobe=nprobe,
                                               n_candidates=n_candidates, routing_key=routing_key,
                                               exhaustive=exhaustive, filter=filter, doc_ids=doc_ids))
        return self._stream(stream, queries, timeout)

    def _stream(self, stream: base.SearchStream, queries: Iterable[Any],
                timeout: float | None) -> Iterator[SearchResult]:
        call = self._stubs.search.SearchStream(stream.requests(queries),
                                               timeout=self._deadline(timeout).remaining(),
                                               metadata=stream.metadata)
        try:
            for response in call:
                yield stream.accept(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id=stream.in_flight_id) from exc
        finally:
            call.cancel()  # no-op once finished; stops the server's work if the caller stops early
        stream.finish()

    def explain(self, index: str, doc_id: str, query: str = "", *, query_token: int | None = None,
                render: bool = False, version: str | None = None, alpha: float = 0.5,
                routing_key: str = "", query_vectors: Any = None,
                timeout: float | None = None) -> Explanation:
        """Why `doc_id` scored what it did for `query` (or `query_vectors`) on `index`: the
        exact MaxSim score and each query token's best document token; for an image document
        (a page) also its patch (row, col) and pixel box, and the per-patch score grid, for one
        `query_token` (0-based) or for all tokens summed. render=True adds a heatmap PNG of the
        page (image documents only; `Explanation.save_heatmap(path)` writes it), `alpha` its
        opacity in (0, 1] (0 means the server default, 0.5). `version` pins a version loaded on
        the server (default: the one routing picks for `routing_key`, as search does)."""
        request = convert.explain_request(index, doc_id, query, query_token=query_token, render=render,
                                          version=version, alpha=alpha, routing_key=routing_key,
                                          query_vectors=query_vectors)
        read = functools.partial(convert.from_explain_response, query_token=query_token)
        return self._unary(base.Call("search", "Explain", request, read), timeout)

    # --- encode --------------------------------------------------------------------------------

    def encode_query(self, index: str | None, text: str, *, encoder_id: str | None = None,
                     timeout: float | None = None) -> Matrix:
        """The query multi-vector of `text` with the encoder serving `index` (or `encoder_id`)."""
        return self._unary(base.encode_query(index, text, encoder_id), timeout)

    def encode_documents(self, index: str | None, texts: Iterable[str], *,
                         encoder_id: str | None = None,
                         timeout: float | None = None) -> list[Matrix]:
        """One document multi-vector per text, in order."""
        return self._unary(base.encode_documents(index, texts, encoder_id), timeout)

    # --- registry ------------------------------------------------------------------------------

    def list_indexes(self, *, timeout: float | None = None) -> list[IndexInfo]:
        return self._unary(base.list_indexes(), timeout)

    def get_index(self, name: str, *, timeout: float | None = None) -> IndexInfo:
        return self._unary(base.get_index(name), timeout)

    def list_versions(self, index: str, *, timeout: float | None = None) -> list[Version]:
        return self._unary(base.list_versions(index), timeout)

    def get_version(self, index: str, version: str, *, timeout: float | None = None) -> Version:
        return self._unary(base.get_version(index, version), timeout)

    # --- ingestion -----------------------------------------------------------------------------

    def ingest(self, index: str, documents: Iterable[IngestDoc | Mapping[str, Any]], *,
               encoder_id: str | None = None, codec: str = "fp16", activate: bool = False,
               pool_factor: int = 1, external_vectors: bool = False, pdf_dpi: int = 0,
               n_centroids: int = 0, actor: str = "",
               on_progress: Callable[[IngestProgress], Any] | None = None,
               timeout: float | None = None) -> IngestResult:
        """Stream `documents` to the server and build a new version of `index` (created if
        new) from them; returns the READY version, the documents refused and the counts.

        A document is an IngestDoc (`IngestDoc.text(id, text)`, `.image(id, png_bytes)`,
        `.pdf(id, pdf_bytes)` whose pages become "<id>#p<page>", `.file(path)`, or
        `.vectors(id, matrix)` with external_vectors=True) or a dict with the same fields
        ({"id", "text" | "image" | "pdf" | "vectors", "metadata"?, "filename"?}); `documents`
        is consumed lazily, so it may be a generator. A document the server cannot index
        (corrupt image, encrypted PDF, duplicate id...) is reported in `IngestResult.errors`
        and skipped. `encoder_id`: default the stable version's encoder, else the server's
        bundled one. `activate` makes the version stable (an index's first version always is).
        `on_progress(IngestProgress)` sees every progress message; raising from it cancels the
        ingest. Failing calls raise (nothing is published): InvalidArgumentError (bad options,
        vectors that do not fit, no document indexable), NotFoundError (unknown encoder_id),
        ResourceExhaustedError (over the server's max_ingest_documents). `timeout` bounds the
        whole stream (default: the client's): give large ingests a longer one."""
        stream = base.IngestStream(IngestOptions(index, encoder_id or "", codec, activate, pool_factor,
                                                 external_vectors, pdf_dpi, n_centroids, actor), on_progress)
        call = self._stubs.ingest.Ingest(stream.requests(documents), timeout=self._deadline(timeout).remaining(),
                                         metadata=stream.metadata)
        stream.bind(call.cancel)
        try:
            for message in call:
                stream.accept(message)
        except grpc.RpcError as exc:
            raise stream.error(exc) from exc
        finally:
            call.cancel()  # no-op once finished; stops the build if the caller stops early
        return stream.finish()

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, index: str, queries: Iterable[EvalQuery | Mapping[str, Any]], *,
                 versions: Sequence[str] | None = None, k: int = 100, query_set: str = "",
                 record: bool = False, nprobe: int | None = None, n_candidates: int | None = None,
                 timeout: float | None = None) -> list[VersionEvaluation]:
        """Run judged `queries` on `versions` of `index` (one or two; None: stable, and
        the canary if one runs) and return each version's scores, in that order: nDCG@10,
        recall@k, MRR@10, latency percentiles. A query is an EvalQuery or a dict
        {"query_id", "query", "relevant": {doc_id: gain}}. `record` stores the results on the
        versions in the registry (under `query_set`, default: a digest of the queries), where
        `get_version(...).evaluations` and promote policies find them."""
        request = convert.evaluate_request(index, queries, versions=versions, k=k, query_set=query_set,
                                           record=record, nprobe=nprobe, n_candidates=n_candidates)
        return self._unary(base.Call("evaluation", "Evaluate", request, convert.from_evaluate_response),
                           timeout)

    # --- rollouts ------------------------------------------------------------------------------

    # Every change below takes the same keywords and answers with the rollout after it:
    #   expected_generation  refuse (AbortedError) unless the rollout is still at this generation
    #   actor, reason        recorded in the audit log (actor "" -> "api")
    #   wait_for_replicas    seconds to wait until every live replica serves the change; the
    #                        answer's pending_replicas names those that had not (no error)
    # A change routing traffic to a version that fails a check (not READY, files differ from
    # the manifest, encoder does not load) raises FailedPreconditionError; its
    # error_metadata["check"] names the check, and nothing changed.

    def get_rollout(self, index: str, *, timeout: float | None = None) -> RolloutStatus:
        """The rollout of `index`, who serves it, and the answering server's shadow statistics,
        load errors and loaded versions."""
        return self._unary(base.get_rollout(index), timeout)

    def start_canary(self, index: str, version: str, percent: int, *,
                     expected_generation: int | None = None, actor: str = "", reason: str = "",
                     wait_for_replicas: float | None = None,
                     timeout: float | None = None) -> RolloutStatus:
        """Send `percent`% of routing keys to `version` beside stable."""
        request = convert.start_canary_request(index, version, percent, expected_generation=expected_generation,
                                               actor=actor, reason=reason, wait_for_replicas=wait_for_replicas)
        return self._change("StartCanary", request, wait_for_replicas, timeout)

    def set_canary_percent(self, index: str, percent: int, *, expected_generation: int | None = None,
                           actor: str = "", reason: str = "", wait_for_replicas: float | None = None,
                           timeout: float | None = None) -> RolloutStatus:
        """Change the canary's share; raising it never moves a routing key back to stable."""
        request = convert.set_canary_percent_request(index, percent, expected_generation=expected_generation,
                                                     actor=actor, reason=reason,
                                                     wait_for_replicas=wait_for_replicas)
        return self._change("SetCanaryPercent", request, wait_for_replicas, timeout)

    def set_shadow(self, index: str, version: str, percent: int = 100, *,
                   expected_generation: int | None = None, actor: str = "", reason: str = "",
                   wait_for_replicas: float | None = None, timeout: float | None = None) -> RolloutStatus:
        """Mirror `percent`% of queries to `version` after answering them (never returned)."""
        request = convert.set_shadow_request(index, version, percent, expected_generation=expected_generation,
                                             actor=actor, reason=reason, wait_for_replicas=wait_for_replicas)
        return self._change("SetShadow", request, wait_for_replicas, timeout)

    def clear_shadow(self, index: str, *, expected_generation: int | None = None, actor: str = "",
                     reason: str = "", wait_for_replicas: float | None = None,
                     timeout: float | None = None) -> RolloutStatus:
        request = convert.clear_shadow_request(index, expected_generation=expected_generation, actor=actor,
                                               reason=reason, wait_for_replicas=wait_for_replicas)
        return self._change("ClearShadow", request, wait_for_replicas, timeout)

    def promote(self, index: str, *, policy: PromotePolicy | None = None,
                max_ndcg_drop: float | None = None, min_shadow_overlap: float | None = None,
                min_shadow_compared: int | None = None, expected_generation: int | None = None,
                actor: str = "", reason: str = "", wait_for_replicas: float | None = None,
                timeout: float | None = None) -> RolloutStatus:
        """canary -> stable; the old stable is kept as previous_stable. With a `policy` (or its
        rules as keywords) the server first checks it and refuses with FailedPreconditionError,
        error_metadata["rule"] naming the failed rule, changing nothing (see PromotePolicy)."""
        request = convert.promote_request(
            index, policy=convert.policy_of(policy, max_ndcg_drop, min_shadow_overlap, min_shadow_compared),
            expected_generation=expected_generation, actor=actor, reason=reason,
            wait_for_replicas=wait_for_replicas)
        return self._change("Promote", request, wait_for_replicas, timeout)

    def rollback(self, index: str, *, expected_generation: int | None = None, actor: str = "",
                 reason: str = "", wait_for_replicas: float | None = None,
                 timeout: float | None = None) -> RolloutStatus:
        """stable <-> previous_stable in one step; a running canary ends."""
        request = convert.rollback_request(index, expected_generation=expected_generation, actor=actor,
                                           reason=reason, wait_for_replicas=wait_for_replicas)
        return self._change("Rollback", request, wait_for_replicas, timeout)

    def abort_canary(self, index: str, *, expected_generation: int | None = None, actor: str = "",
                     reason: str = "", wait_for_replicas: float | None = None,
                     timeout: float | None = None) -> RolloutStatus:
        """End the canary: all traffic back to stable."""
        request = convert.abort_canary_request(index, expected_generation=expected_generation, actor=actor,
                                               reason=reason, wait_for_replicas=wait_for_replicas)
        return self._change("AbortCanary", request, wait_for_replicas, timeout)

    def set_stable(self, index: str, version: str, *, expected_generation: int | None = None,
                   actor: str = "", reason: str = "", wait_for_replicas: float | None = None,
                   timeout: float | None = None) -> RolloutStatus:
        """Point stable at `version` directly (no canary); the old stable becomes previous."""
        request = convert.set_stable_request(index, version, expected_generation=expected_generation,
                                             actor=actor, reason=reason, wait_for_replicas=wait_for_replicas)
        return self._change("SetStable", request, wait_for_replicas, timeout)

    def rollout_history(self, index: str, limit: int = 20, *,
                        timeout: float | None = None) -> list[AuditEntry]:
        """The rollout changes of `index` (audit log), newest first."""
        return self._unary(base.rollout_history(index, limit), timeout)

    def _change(self, method: str, request: object, wait_for_replicas: float | None,
                timeout: float | None) -> RolloutStatus:
        timeout = base.change_timeout(timeout, self._timeout, wait_for_replicas)
        return self._unary(base.rollout_change(method, request), timeout)

    # --- plumbing ------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> base.Deadline:
        return base.Deadline.after(self._timeout if timeout is None else timeout)

    def _unary(self, call: base.Call[T], timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        method = call.bind(self._stubs)
        attempt = 0
        while True:
            try:
                response = method(call.request, timeout=deadline.remaining(),
                                  metadata=call.metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id=call.request_id)
                delay = self._retry.delay(error, attempt, deadline)
                if delay is None:
                    raise error from exc
            else:
                return call.convert(response)
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"
