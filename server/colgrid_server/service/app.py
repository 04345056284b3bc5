"""Assemble and run the gRPC server: services, health, reflection, registry watcher and
heartbeat, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_registry import open_registry
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.config import Settings
from colgrid_server.errors import FailedPrecondition
from colgrid_server.interrupted import collect_interrupted
from colgrid_server.observability import Metrics, Tracing, WorkerPool, request_id
from colgrid_server.paths import DataDir
from colgrid_server.security import Gate, bind, guard_interceptors, startup_warnings
from colgrid_server.serving import Replica, ServingState, default_replica_id
from colgrid_server.serving._replica import advertised_host
from colgrid_server.service.encode_rpc import EncodeService
from colgrid_server.service.malformed import MalformedRequestInterceptor
from colgrid_server.service.evaluate_rpc import EvaluationService
from colgrid_server.service.ingest_rpc import IngestService
from colgrid_server.service.registry_rpc import RegistryService
from colgrid_server.service.rollout_rpc import RolloutService
from colgrid_server.service.search_rpc import SearchService
from colgrid_server.storage import ObjectStorage, storage_for

log = logging.getLogger(__name__)
SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name
                      for name in ("SearchService", "EncodeService", "RegistryService", "RolloutService",
                                   "EvaluationService", "IngestService"))
# A replica counts as live (and is waited for) while its last heartbeat is this many poll
# intervals old at most, and never less than LIVE_MIN_SECONDS.
LIVE_POLLS = 3
ADMIN_THREADS = 2
LIVE_MIN_SECONDS = 10.0


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Puts the caller's `x-request-id` (or a fresh one) in a contextvar for logs."""

    async def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id.set(str(metadata.get("x-request-id") or uuid.uuid4().hex[:16]))
        return await continuation(handler_call_details)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    state: ServingState
    replica: Replica
    health: HealthServicer
    executor: ThreadPoolExecutor
    admin_executor: ThreadPoolExecutor
    settings: Settings
    metrics: Metrics | None = None  # the HTTP exporter, when metrics_port is set
    tracing: Tracing | None = None  # the OTLP exporter, when otel_endpoint is set
    _watcher: asyncio.Task | None = field(default=None, repr=False)

    async def refresh(self) -> bool:
        """Apply registry changes now and report what is served (the watcher also does this
        every poll interval)."""
        loop = asyncio.get_running_loop()
        complete = await loop.run_in_executor(self.admin_executor, self.state.refresh)
        await loop.run_in_executor(self.admin_executor, self.replica.heartbeat)
        await self._publish_health()
        return complete

    async def _publish_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", status)
        for name in SERVICE_NAMES:
            await self.health.set(name, status)
        for index in self.state.snapshot():
            await self.health.set(f"colgrid.index.{index}", status)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_seconds)
            try:
                # Beat before refreshing too: a long version load must not make this replica
                # look dead to the others.
                await asyncio.get_running_loop().run_in_executor(self.admin_executor, self.replica.heartbeat)
                await self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                log.exception("registry refresh failed; will retry")

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.admin_executor.shutdown(wait=True, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.close()
        if self.tracing is not None:
            self.tracing.close()
        self.replica.forget()  # a replica that stopped on purpose is not waited for
        self.state.close()
        self.state.registry.close()


async def start_server(settings: Settings) -> RunningServer:
    """Start serving on settings.host:settings.port (port 0 picks a free one). Health reports
    NOT_SERVING until the registry's stable versions have been loaded."""
    data = DataDir(settings.data_dir)
    data.root.mkdir(parents=True, exist_ok=True)
    registry = open_registry(settings.registry_location)
    storage = storage_for(settings)
    # With object storage, encoders the data dir lacks are fetched from it like versions.
    catalog = EncoderCatalog(data.encoders, threads=settings.encoder_threads or None,
                             fetch=storage.fetch_encoder if isinstance(storage, ObjectStorage) else None)
    device = None if settings.device == "auto" else settings.device
    state = ServingState(registry, catalog, device=device, storage=storage, screen=settings.int8_screen)
    executor = WorkerPool(settings.worker_threads, thread_name_prefix="colgrid-work")
    # Registry polls, version loads and rollout changes run here, never queued behind searches
    # (and a slow version load never occupies a search worker).
    admin_executor = ThreadPoolExecutor(ADMIN_THREADS, thread_name_prefix="colgrid-admin")
    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes)]
    # Metrics sit outside the guards so refused calls are counted; auth refuses before
    # admission so unauthenticated callers never take a place in the queue.
    gate = Gate.for_settings(settings)
    metrics = Metrics(executor, gate, recall=state.recall) if settings.metrics_port else None
    tracing = (Tracing(settings.otel_endpoint, service_name=settings.otel_service_name,
                       instance=settings.replica_id or f"{socket.gethostname()}:{os.getpid()}",
                       sample_ratio=settings.otel_sample_ratio) if settings.otel_endpoint else None)
    # Malformed protobuf requests become INVALID_ARGUMENT (outermost: it replaces the parser).
    interceptors = [MalformedRequestInterceptor(), RequestIdInterceptor(), *([tracing.interceptor] if tracing else []),
                    *([metrics.interceptor] if metrics else []), *guard_interceptors(settings, gate)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    port = bind(server, settings)  # TLS when tls_cert/tls_key are set
    if port == 0 and settings.port != 0:
        raise FailedPrecondition(f"cannot listen on {settings.target}: is another server using the port?")
    # Several replicas behind one address need distinct ids (COLGRID_REPLICA_ID); else
    # host:port+pid, known now that the port is bound.
    replica = Replica(registry, state,
                      replica_id=settings.replica_id or default_replica_id(settings.host, port),
                      address=f"{advertised_host(settings.host)}:{port}",
                      live_within_s=max(LIVE_MIN_SECONDS, LIVE_POLLS * settings.registry_poll_seconds),
                      forget_after_s=settings.replica_forget_after_seconds)
    pb_grpc.add_SearchServiceServicer_to_server(SearchService(state, settings, executor), server)
    pb_grpc.add_EncodeServiceServicer_to_server(EncodeService(state, settings, executor), server)
    pb_grpc.add_RegistryServiceServicer_to_server(RegistryService(state, executor), server)
    pb_grpc.add_RolloutServiceServicer_to_server(RolloutService(state, replica, admin_executor), server)
    pb_grpc.add_EvaluationServiceServicer_to_server(EvaluationService(state, settings, executor), server)
    pb_grpc.add_IngestServiceServicer_to_server(IngestService(state, settings), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    if metrics is not None:  # before the gRPC server, so a busy metrics port fails the start cleanly
        metrics.serve(settings.metrics_host, settings.metrics_port)
    await server.start()
    for warning in startup_warnings(settings, port):
        log.warning(warning)
    # Builds killed on this host (their BUILDING rows and temporary files) are collected once
    # at start-up, so a crash never leaves a version BUILDING forever.
    for interrupted in collect_interrupted(data, registry):
        log.warning("marked %s/%s FAILED: %s (removed %d leftover paths)", interrupted.index, interrupted.version,
                    interrupted.reason, len(interrupted.removed))
    running = RunningServer(server=server, port=port, state=state, replica=replica, health=health,
                            executor=executor, admin_executor=admin_executor, settings=settings,
                            metrics=metrics, tracing=tracing)
    if not await running.refresh():
        log.warning("some indexes could not be loaded; serving the rest")
    running._watcher = asyncio.create_task(running._watch())
    log.info("colgrid serving on %s:%d (indexes: %s)", settings.host, port,
             ", ".join(f"{k}@{v.stable.version}" for k, v in state.snapshot().items()) or "none")
    return running


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then drain in-flight requests for settings.grace_seconds."""

    async def main() -> None:
        running = await start_server(settings)
        print(f"colgrid serving on {settings.host}:{running.port} "
              f"(indexes: {', '.join(f'{k}@{v.stable.version}' for k, v in running.state.snapshot().items()) or 'none'})",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("shutting down: draining in-flight requests", flush=True)
        await running.stop()

    asyncio.run(main())
