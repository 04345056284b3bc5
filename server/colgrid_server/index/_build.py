"""build_version: documents -> encoder (in batches) -> VersionWriter, streaming."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from colgrid_server.documents import Document, validate_document
from colgrid_server.encoders.types import EncodedText
from colgrid_server.errors import InvalidArgument
from colgrid_server.index._format import EncoderRef, VersionSummary
from colgrid_server.index._writer import VersionWriter


class DocumentEncoder(Protocol):
    """What build_version needs from an encoder."""

    id: str
    kind: str
    dim: int

    def encode_documents(self, texts: list[str]) -> list[EncodedText]: ...


def build_version(
    documents: Iterable[Document],
    encoder: DocumentEncoder,
    final_dir: Path,
    *,
    batch_size: int = 64,
    build_params: Mapping[str, Any] | None = None,
    progress: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> VersionSummary:
    """Encode and write every document, then publish the version at final_dir.
    on_progress(n) is called with the number of documents written so far after each batch."""
    if batch_size <= 0:
        raise InvalidArgument(f"batch_size must be positive, got {batch_size}", field="batch_size")
    ref = EncoderRef(id=encoder.id, kind=encoder.kind, dim=int(encoder.dim))
    params = {"batch_size": batch_size, **dict(build_params or {})}
    done = 0
    with VersionWriter(Path(final_dir), encoder=ref, build_params=params) as writer, tqdm(
        desc="encode documents", unit="doc", disable=not progress
    ) as bar:
        for batch in _batches(documents, batch_size):
            encoded = encoder.encode_documents([doc.text for doc in batch])
            if len(encoded) != len(batch):
                raise InvalidArgument(f"encoder returned {len(encoded)} results for {len(batch)} documents")
            for doc, enc in zip(batch, encoded):
                try:
                    writer.add(doc.id, enc.vectors, np.asarray(enc.spans), doc.text, doc.metadata)
                except InvalidArgument as exc:
                    message = str(exc) if repr(doc.id) in str(exc) else f"document {doc.id!r}: {exc}"
                    raise InvalidArgument(message, field=exc.field) from exc
            done += len(batch)
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(done)
        return writer.finalize(progress=progress)


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(documents)
    while batch := list(islice(iterator, size)):
        for doc in batch:
            try:
                validate_document(doc)
            except InvalidArgument as exc:
                name = doc.id if isinstance(doc.id, str) else "(no id)"
                raise InvalidArgument(f"document {name!r}: {exc}", field=exc.field) from exc
        yield batch
