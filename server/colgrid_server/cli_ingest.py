"""`colgrid ingest INDEX PATH...`: stream files to a running server (the SDK's `Client.ingest`)
and build a new version there, with a progress bar and every refused document printed.

Files are walked as `colgrid index build` walks them (directories recursively, sorted, hidden
entries skipped, ids relative to the directory given) and read one at a time as the stream
needs them: text (.txt .md), images (PNG, JPEG, TIFF, WebP), PDFs (one document per page on the
server) and JSONL ({"id", "text", "metadata"?} per line). Anything else is skipped here.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from colgrid_server.cli_client import connect

CODECS = ("fp16", "int8", "residual4", "residual2", "entropy4", "entropy2")


def add_ingest_verb(verbs: argparse._SubParsersAction, client_opts) -> None:
    p = verbs.add_parser("ingest", help="stream files to a running server and build a version there",
                         description="Stream files and folders to the server at --target and build a new "
                                     "version of INDEX there (created if new): text, images, PDFs (a document "
                                     "per page) and JSONL. Refused documents are printed; the rest is indexed.")
    p.add_argument("index")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders (walked recursively)")
    p.add_argument("--encoder-id", default="", help="encoder id on the server (default: the stable version's, "
                                                    "else the bundled one)")
    p.add_argument("--activate", action="store_true", help="make the new version stable (an index's first always is)")
    p.add_argument("--codec", choices=CODECS, default="fp16", help="token storage on the server")
    p.add_argument("--pool-factor", type=int, default=1, help="image documents: pool patch vectors by this factor")
    p.add_argument("--pdf-dpi", type=int, default=0, help="PDF rendering resolution (default: the server's)")
    p.add_argument("--n-centroids", type=int, default=0, help=argparse.SUPPRESS)
    client_opts(p)
    p.set_defaults(fn=cmd_ingest, timeout=None)  # an ingest runs as long as it needs unless --timeout


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm


    skipped: list[str] = []
    bar = tqdm(desc=f"ingest {args.index}", unit="doc", file=sys.stderr, disable=None, dynamic_ncols=True)

    def local_error(name: str, reason: str) -> None:
        skipped.append(name)
        bar.write(f"skipped {name}: {reason}", file=sys.stderr)

    def on_progress(progress: Any) -> None:
        bar.n = progress.received
        bar.set_postfix_str(f"{progress.stage}, {progress.encoded} indexed, {progress.failed} refused")
        for error in progress.errors:
            bar.write(f"skipped {error.document}: {error.message} [{error.code}]", file=sys.stderr)

    try:
        with connect(args) as client:
            result = client.ingest(args.index, _documents(args.paths, local_error), encoder_id=args.encoder_id or None,
                                   codec=args.codec, activate=args.activate, pool_factor=args.pool_factor,
                                   pdf_dpi=args.pdf_dpi, n_centroids=args.n_centroids, actor=_actor(),
                                   on_progress=on_progress)
    finally:
        bar.close()
    v = result.version
    refused = result.failed + len(skipped)
    print(f"{v.index}/{v.version} READY: {v.documents} documents, {v.tokens} tokens, ingested in "
          f"{result.elapsed_s:.1f}s" + (f", {refused} inputs skipped" if refused else ""))
    return 0


def _documents(paths: list[Path], local_error) -> Iterator[Any]:
    """IngestDocs, read lazily in a stable order; what cannot be sent is reported and skipped."""
    from colgrid_client import IngestDoc

    for root in paths:
        if root.is_dir():
            files = [(f, f.relative_to(root).as_posix()) for f in _walk(root)]
        elif root.is_file():
            files = [(root, root.name)]
        else:
            local_error(str(root), "does not exist")
            continue
        for path, rel in files:
            if path.suffix.lower() == ".jsonl":
                yield from _jsonl(path, rel, local_error)
                continue
            try:
                yield IngestDoc.file(path, id=rel)
            except (ValueError, OSError) as exc:  # unsupported suffix, unreadable, not UTF-8
                local_error(rel, str(exc))


def _walk(directory: Path) -> Iterator[Path]:
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue  # .git, .DS_Store, editor swap files: never documents
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _jsonl(path: Path, rel: str, local_error) -> Iterator[Any]:
    from colgrid_client import IngestDoc

    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError("expected a JSON object with a string 'text'")
                metadata = {"source": rel, "line": lineno, **(obj.get("metadata") or {})}
                yield IngestDoc.text(str(obj.get("id", "")), obj["text"], metadata, filename=rel)
            except ValueError as exc:
                local_error(f"{rel}#L{lineno}", f"line {lineno}: {exc}")


def _actor() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"
