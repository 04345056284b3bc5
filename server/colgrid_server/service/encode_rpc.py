"""EncodeService: query and document multi-vectors for callers who embed elsewhere."""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import grpc

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.config import Settings
from colgrid_server.errors import InvalidArgument
from colgrid_server.serving import ServingState
from colgrid_server.service import convert, requests
from colgrid_server.service.status import abort_with


class EncodeService(pb_grpc.EncodeServiceServicer):
    def __init__(self, state: ServingState, settings: Settings, executor: Executor) -> None:
        self._state = state
        self._settings = settings
        self._executor = executor

    def _encoder(self, request) -> tuple[object, str]:
        target = request.WhichOneof("target")
        if target == "index":
            served = self._state.resolve(requests.index_name(request.index))
            return served.encoder, served.version
        if target == "encoder_id":
            return self._state.find_encoder(request.encoder_id), ""
        raise InvalidArgument("name a target: index or encoder_id", field="target")

    async def EncodeQuery(self, request: pb.EncodeQueryRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        try:
            encoder, version = self._encoder(request)
            text = requests.encode_texts([request.text], self._settings, field="text")[0]
            if len(text) > self._settings.max_query_chars:
                raise InvalidArgument(f"text has {len(text)} characters; the limit is "
                                      f"{self._settings.max_query_chars}", field="text")
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._executor, encoder.encode_queries, [text])
            return convert.encode_response(encoded, encoder_id=encoder.id, version=version)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
            raise

    async def EncodeDocuments(self, request: pb.EncodeDocumentsRequest,
                              context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        try:
            encoder, version = self._encoder(request)
            texts = requests.encode_texts(list(request.texts), self._settings)
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._executor, encoder.encode_documents, texts)
            return convert.encode_response(encoded, encoder_id=encoder.id, version=version)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
            raise
