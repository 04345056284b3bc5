"""The asyncio client: the same surface as `Client`, awaited, over grpc.aio."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
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


class AsyncClient:
    """An asyncio colgrid client over one grpc.aio channel; create it inside the running loop.

    Same options and semantics as `Client`: `timeout` bounds each whole call (retries
    included), UNAVAILABLE is retried with jittered exponential backoff on unary calls only;
    `api_key`, `root_certificates`, `private_key` and `certificate_chain` as for `Client`.
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
        self._channel = base.aio_channel(target, credentials, base.channel_options(options), api_key)
        self._stubs = base.Stubs.on(self._channel)
        self.target = target

    # --- search --------------------------------------------------------------------------------

    async def search(self, index: str, query: str = "", k: int = 10, *, explain: bool = False,
                     nprobe: int = 0, n_candidates: int = 0, routing_key: str = "",
                     query_vectors: Any = None, exhaustive: bool = False,
                     filter: Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
                     doc_ids: Sequence[str] | None = None,
                     timeout: float | None = None) -> SearchResult:
        """See `Client.search`."""
        return await self._unary(base.search(index, query, k, explain, nprobe, n_candidates,
                                             routing_key, query_vectors, exhaustive, filter, doc_ids), timeout)

    def search_stream(self, index: str,
                      queries: Iterable[str | Mapping[str, Any]]
                      | AsyncIterable[str | Mapping[str, Any]], *,
                      k: int = 10, explain: bool = False, nprobe: int = 0, n_candidates: int = 0,
                      routing_key: str = "", exhaustive: bool = False,
                      filter: Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
                      doc_ids: Sequence[str] | None = None,
                      timeout: float | None = None) -> AsyncIterator[SearchResult]:
        """See `Client.search_stream`; `async for` over the results. `queries` may be async."""
        stream = base.SearchStream(index, dict(k=k, explain=explain, nprobe=nprobe,
                                               n_candidates=n_candidates, routing_key=routing_key,
                                               exhaustive=exhaustive, filter=filter, doc_ids=doc_ids))
        return self._stream(stream, queries, timeout)

    async def _stream(self, stream: base.SearchStream, queries: Any,
                      timeout: float | None) -> AsyncIterator[SearchResult]:
        call = self._stubs.search.SearchStream(stream.arequests(queries),
                                               timeout=self._deadline(timeout).remaining(),
                                               metadata=stream.metadata)
        try:
            async for response in call:
                yield stream.accept(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id=stream.in_flight_id) from exc
        finally:
            call.cancel()  # no-op once finished; stops the server's work if the caller stops early
        stream.finish()

    async def explain(self, index: str, doc_id: str, query: str = "", *, query_token: int | None = None,
                      render: bool = False, version: str | None = None, alpha: float = 0.5,
                      routing_key: str = "", query_vectors: Any = None,
                      timeout: float | None = None) -> Explanation:
        """See `Client.explain`."""
        request = convert.explain_request(index, doc_id, query, query_token=query_token, render=render,
                                          version=version, alpha=alpha, routing_key=routing_key,
                                          query_vectors=query_vectors)
        read = functools.partial(convert.from_explain_response, query_token=query_token)
        return await self._unary(base.Call("search", "Explain", request, read), timeout)

    # --- encode --------------------------------------------------------------------------------

    async def encode_query(self, index: str | None, text: str, *, encoder_id: str | None = None,
                           timeout: float | None = None) -> Matrix:
        return await self._unary(base.encode_query(index, text, encoder_id), timeout)

    async def encode_documents(self, index: str | None, texts: Iterable[str], *,
                               encoder_id: str | None = None,
                               timeout: float | None = None) -> list[Matrix]:
        return await self._unary(base.encode_documents(index, texts, encoder_id), timeout)

    # --- registry ------------------------------------------------------------------------------

    async def list_indexes(self, *, timeout: float | None = None) -> list[IndexInfo]:
        return await self._unary(base.list_indexes(), timeout)

    async def get_index(self, name: str, *, timeout: float | None = None) -> IndexInfo:
        return await self._unary(base.get_index(name), timeout)

    async def list_versions(self, index: str, *, timeout: float | None = None) -> list[Version]:
        return await self._unary(base.list_versions(index), timeout)

    async def get_version(self, index: str, version: str, *,
                          timeout: float | None = None) -> Version:
        return await self._unary(base.get_version(index, version), timeout)

    # --- ingestion -----------------------------------------------------------------------------

    async def ingest(self, index: str, documents: Iterable[IngestDoc | Mapping[str, Any]]
                     | AsyncIterable[IngestDoc | Mapping[str, Any]], *,
                     encoder_id: str | None = None, codec: str = "fp16", activate: bool = False,
                     pool_factor: int = 1, external_vectors: bool = False, pdf_dpi: int = 0,
                     n_centroids: int = 0, actor: str = "",
                     on_progress: Callable[[IngestProgress], Any] | None = None,
                     timeout: float | None = None) -> IngestResult:
        """See `Client.ingest`; `documents` may also be an async iterable."""
        stream = base.IngestStream(IngestOptions(index, encoder_id or "", codec, activate, pool_factor,
                                                 external_vectors, pdf_dpi, n_centroids, actor), on_progress)
        call = self._stubs.ingest.Ingest(stream.arequests(documents), timeout=self._deadline(timeout).remaining(),
                                         metadata=stream.metadata)
        stream.bind(call.cancel)
        try:
            async for message in call:
                stream.accept(message)
        except grpc.RpcError as exc:
            raise stream.error(exc) from exc
        finally:
            call.cancel()  # no-op once finished; stops the build if the caller stops early
        return stream.finish()

    # --- evaluation ----------------------------------------------------------------------------

    async def evaluate(self, index: str, queries: Iterable[EvalQuery | Mapping[str, Any]], *,
                       versions: Sequence[str] | None = None, k: int = 100, query_set: str = "",
                       record: bool = False, nprobe: int | None = None, n_candidates: int | None = None,
                       timeout: float | None = None) -> list[VersionEvaluation]:
        """See `Client.evaluate`."""
        request = convert.evaluate_request(index, queries, versions=versions, k=k, query_set=query_set,
                                           record=record, nprobe=nprobe, n_candidates=n_candidates)
        return await self._unary(base.Call("evaluation", "Evaluate", request, convert.from_evaluate_response),
                                 timeout)

    # --- rollouts ------------------------------------------------------------------------------

    async def get_rollout(self, index: str, *, timeout: float | None = None) -> RolloutStatus:
        """The rollout of `index`, who serves it, and the answering server's shadow statistics,
        load errors and loaded versions."""
        return await self._unary(base.get_rollout(index), timeout)

    async def start_canary(self, index: str, version: str, percent: int, *,
                           expected_generation: int | None = None, actor: str = "", reason: str = "",
                           wait_for_replicas: float | None = None,
                           timeout: float | None = None) -> RolloutStatus:
        """Send `percent`% of routing keys to `version` beside stable."""
        request = convert.start_canary_request(index, version, percent, expected_generation=expected_generation,
                                               actor=actor, reason=reason, wait_for_replicas=wait_for_replicas)
        return await self._change("StartCanary", request, wait_for_replicas, timeout)

    async def set_canary_percent(self, index: str, percent: int, *, expected_generation: int | None = None,
                                 actor: str = "", reason: str = "", wait_for_replicas: float | None = None,
                                 timeout: float | None = None) -> RolloutStatus:
        """Change the canary's share; raising it never moves a routing key back to stable."""
        request = convert.set_canary_percent_request(index, percent, expected_generation=expected_generation,
                                                     actor=actor, reason=reason,
                                                     wait_for_replicas=wait_for_replicas)
        return await self._change("SetCanaryPercent", request, wait_for_replicas, timeout)

    async def set_shadow(self, index: str, version: str, percent: int = 100, *,
                         expected_generation: int | None = None, actor: str = "", reason: str = "",
                         wait_for_replicas: float | None = None, timeout: float | None = None) -> RolloutStatus:
        """Mirror `percent`% of queries to `version` after answering them (never returned)."""
        request = convert.set_shadow_request(index, version, percent, expected_generation=expected_generation,
                                             actor=actor, reason=reason, wait_for_replicas=wait_for_replicas)
        return await self._change("SetShadow", request, wait_for_replicas, timeout)

    async def clear_shadow(self, index: str, *, expected_generation: int | None = None, actor: str = "",
                           reason: str = "", wait_for_replicas: float | None = None,
                           timeout: float | None = None) -> RolloutStatus:
        request = convert.clear_shadow_request(index, expected_generation=expected_generation, actor=actor,
                                               reason=reason, wait_for_replicas=wait_for_replicas)
        return await self._change("ClearShadow", request, wait_for_replicas, timeout)

    async def promote(self, index: str, *, policy: PromotePolicy | None = None,
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
        return await self._change("Promote", request, wait_for_replicas, timeout)

    async def rollback(self, index: str, *, expected_generation: int | None = None, actor: str = "",
                       reason: str = "", wait_for_replicas: float | None = None,
                       timeout: float | None = None) -> RolloutStatus:
        """stable <-> previous_stable in one step; a running canary ends."""
        request = convert.rollback_request(index, expected_generation=expected_generation, actor=actor,
                                           reason=reason, wait_for_replicas=wait_for_replicas)
        return await self._change("Rollback", request, wait_for_replicas, timeout)

    async def abort_canary(self, index: str, *, expected_generation: int | None = None, actor: str = "",
                           reason: str = "", wait_for_replicas: float | None = None,
                           timeout: float | None = None) -> RolloutStatus:
        """End the canary: all traffic back to stable."""
        request = convert.abort_canary_request(index, expected_generation=expected_generation, actor=actor,
                                               reason=reason, wait_for_replicas=wait_for_replicas)
        return await self._change("AbortCanary", request, wait_for_replicas, timeout)

    async def set_stable(self, index: str, version: str, *, expected_generation: int | None = None,
                         actor: str = "", reason: str = "", wait_for_replicas: float | None = None,
                         timeout: float | None = None) -> RolloutStatus:
        """Point stable at `version` directly (no canary); the old stable becomes previous."""
        request = convert.set_stable_request(index, version, expected_generation=expected_generation,
                                             actor=actor, reason=reason, wait_for_replicas=wait_for_replicas)
        return await self._change("SetStable", request, wait_for_replicas, timeout)

    async def rollout_history(self, index: str, limit: int = 20, *,
                              timeout: float | None = None) -> list[AuditEntry]:
        """The rollout changes of `index` (audit log), newest first."""
        return await self._unary(base.rollout_history(index, limit), timeout)

    async def _change(self, method: str, request: object, wait_for_replicas: float | None,
                      timeout: float | None) -> RolloutStatus:
        timeout = base.change_timeout(timeout, self._timeout, wait_for_replicas)
        return await self._unary(base.rollout_change(method, request), timeout)

    # --- plumbing ------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> base.Deadline:
        return base.Deadline.after(self._timeout if timeout is None else timeout)

    async def _unary(self, call: base.Call[T], timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        method = call.bind(self._stubs)
        attempt = 0
        while True:
            try:
                response = await method(call.request, timeout=deadline.remaining(),
                                        metadata=call.metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id=call.request_id)
                delay = self._retry.delay(error, attempt, deadline)
                if delay is None:
                    raise error from exc
            else:
                return call.convert(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"
