"""RegistryService (read side): indexes, versions, rollouts."""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import grpc

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_registry import VersionRecord
from colgrid_server.errors import InvalidArgument
from colgrid_server.evaluation import Evaluation
from colgrid_server.serving import ServingState
from colgrid_server.service import convert, requests
from colgrid_server.service.status import abort_with


class RegistryService(pb_grpc.RegistryServiceServicer):
    def __init__(self, state: ServingState, executor: Executor) -> None:
        self._state = state
        self._registry = state.registry
        self._executor = executor

    async def _call(self, context: grpc.aio.ServicerContext, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
            raise

    def _index_info(self, name: str) -> pb.IndexInfo:
        record = self._registry.get_index(name)
        served = self._state.snapshot().get(name)
        rollout = self._registry.get_rollout(name)
        return convert.index_info(record, rollout, versions=len(self._registry.list_versions(name)),
                                  loaded=served is not None and served.stable.version == rollout.stable)

    async def ListIndexes(self, request: pb.ListIndexesRequest, context) -> pb.ListIndexesResponse:
        def run() -> pb.ListIndexesResponse:
            return pb.ListIndexesResponse(indexes=[self._index_info(r.name) for r in self._registry.list_indexes()])
        return await self._call(context, run)

    async def GetIndex(self, request: pb.GetIndexRequest, context) -> pb.IndexInfo:
        return await self._call(context, lambda: self._index_info(requests.index_name(request.index)))

    async def ListVersions(self, request: pb.ListVersionsRequest, context) -> pb.ListVersionsResponse:
        def run() -> pb.ListVersionsResponse:
            name = requests.index_name(request.index)
            return pb.ListVersionsResponse(versions=[self._version(v) for v in self._registry.list_versions(name)])
        return await self._call(context, run)

    async def GetVersion(self, request: pb.GetVersionRequest, context) -> pb.Version:
        def run() -> pb.Version:
            name = requests.index_name(request.index)
            if not request.version:
                raise InvalidArgument("version is required (e.g. v1); see ListVersions", field="version")
            return self._version(self._registry.get_version(name, request.version))
        return await self._call(context, run)

    def _version(self, record: VersionRecord) -> pb.Version:
        evaluations = self._registry.evaluations(record.index, record.version)  # newest first
        return convert.version(record, [Evaluation.from_record(e) for e in evaluations])
