"""`colgrid` command line: serve, demo, encoder export, index build, registry, search, encode,
rollout (in cli_rollout).

Heavy imports (torch, onnxruntime, zarr) happen inside the verbs that need them, so `colgrid
search` and `--help` start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from colgrid_server.cli_client import client_opts, connect
from colgrid_server.cli_eval import add_eval_verb
from colgrid_server.cli_explain import add_explain_verb
from colgrid_server.cli_ingest import CODECS, add_ingest_verb
from colgrid_server.cli_keys import add_keys_verbs
from colgrid_server.cli_rollout import add_rollout_verbs

DEMO_INDEX = "stdlib"


def _settings(args: argparse.Namespace):
    from colgrid_server.config import Settings

    return Settings.load({
        "data_dir": getattr(args, "data_dir", None),
        "registry_url": getattr(args, "registry", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "device": getattr(args, "device", None),
        **{name: getattr(args, name, None) for name in (
            "log_format", "api_keys_file", "tls_cert", "tls_key", "tls_client_ca", "metrics_port", "metrics_host",
            "max_queued_requests", "worker_threads", "int8_screen")},
    })


def _registry(settings):
    from colgrid_registry import open_registry

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_registry(settings.registry_location)


def _logging(level: str, log_format: str = "text") -> None:
    from colgrid_server.observability import configure_logging

    configure_logging(level, log_format)  # json: one object per line, with request ids


# --------------------------------------------------------------------------------- server verbs

def cmd_serve(args: argparse.Namespace) -> int:
    from colgrid_server.service.app import serve

    settings = _settings(args)
    _logging(settings.log_level, settings.log_format)
    serve(settings)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the stdlib-docstrings demo index if it has no READY version, then serve."""
    from colgrid_server.builder import build_index
    from colgrid_server.corpus import iter_docstring_documents
    from colgrid_server.paths import DataDir
    from colgrid_server.service.app import serve
    from colgrid_server.storage import storage_for

    settings = _settings(args)
    _logging(settings.log_level, settings.log_format)
    with _registry(settings) as registry:
        registry.ensure_index(DEMO_INDEX)
        if not registry.get_rollout(DEMO_INDEX).stable:
            print(f"building demo index {DEMO_INDEX!r} from Python standard library docstrings "
                  f"(up to {args.docs} documents) into {settings.data_dir}", flush=True)
            outcome = build_index(DataDir(settings.data_dir), registry, DEMO_INDEX,
                                  iter_docstring_documents(limit=args.docs),
                                  build_params={"corpus": "python-stdlib-docstrings"}, reason="demo",
                                  storage=storage_for(settings))
            print(f"built {DEMO_INDEX}/{outcome.version}: {outcome.summary.documents} documents, "
                  f"{outcome.summary.tokens} tokens", flush=True)
    print(f'try:  .venv/bin/colgrid search {DEMO_INDEX} "parse a JSON document" -k 5 --explain', flush=True)
    serve(settings)
    return 0


# -------------------------------------------------------------------------------- encoder verbs

def cmd_encoder_export(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.kind != "colbert":
        return _export_multimodal(args)
    from colgrid_server.encoders import DEFAULT_ENCODER_NAME, bundled_checkpoint, export_text_encoder

    checkpoint = Path(args.checkpoint) if args.checkpoint else bundled_checkpoint()
    name = args.name or (None if args.checkpoint else DEFAULT_ENCODER_NAME)
    report = export_text_encoder(checkpoint, Path(args.out), name=name,
                                 query_max_length=args.query_max_length or 32,
                                 document_max_length=args.document_max_length or 256,
                                 query_marker=args.query_marker, document_marker=args.document_marker)
    print(f"exported {checkpoint} -> {report.path}\n  encoder id: {report.encoder_id}\n"
          f"  parity: min per-token cosine {report.min_token_cosine:.6f}, max abs diff {report.max_abs_diff:.2e}")
    return 0


def _export_multimodal(args: argparse.Namespace) -> int:
    """ColQwen2 / ColPali (colpali-engine checkpoints, LoRA adapters merged first)."""
    from colgrid_server.encoders import export_multimodal

    if not args.checkpoint:
        raise ValueError(f"--kind {args.kind} needs a local checkpoint (or LoRA adapter) directory")
    lengths = {key: value for key, value in (("query_max_length", args.query_max_length),
                                             ("document_max_length", args.document_max_length)) if value}
    report = export_multimodal(args.kind, Path(args.checkpoint), Path(args.out), name=args.name,
                               base_model=args.base_model, **lengths)
    print(f"exported {args.kind} {args.checkpoint} -> {report.path}\n  encoder id: {report.encoder_id}\n"
          f"  parity: query min cosine {report.query_min_cosine:.6f}, image min cosine "
          f"{report.image_min_cosine:.6f}, end to end {report.end_to_end_min_cosine:.6f}"
          + ("\n  LoRA adapter merged" if report.merged_adapter else ""))
    return 0


def cmd_encoder_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from colgrid_server.encoders import encoder_id, load_spec

    spec = load_spec(Path(args.path))
    print(json.dumps({"id": encoder_id(Path(args.path)), **asdict(spec)}, indent=2, default=str))
    return 0


def cmd_encoder_publish(args: argparse.Namespace) -> int:
    from colgrid_server.storage import ObjectStorage, storage_for

    storage = storage_for(_settings(args))
    if not isinstance(storage, ObjectStorage):
        print("colgrid encoder publish: set COLGRID_STORAGE_URL (s3://bucket/prefix) to the object storage "
              "your servers read", file=sys.stderr)
        return 2
    print(f"{args.path} -> {storage.publish_encoder(Path(args.path))}")
    return 0


# ---------------------------------------------------------------------------------- index verbs

def cmd_index_build(args: argparse.Namespace) -> int:
    from colgrid_server.builder import build_index_from_sources
    from colgrid_server.errors import InvalidArgument
    from colgrid_server.ingest import SourceError, iter_sources
    from colgrid_server.paths import DataDir
    from colgrid_server.storage import storage_for

    settings = _settings(args)
    started = time.perf_counter()
    refused: list[SourceError] = []

    def on_error(error: SourceError) -> None:
        if args.strict:
            raise InvalidArgument(f"{error.id}: {error.reason} [{error.code}] (--strict: nothing was built)",
                                  field="input")
        refused.append(error)
        print(f"skipped {error.id}: {error.reason} [{error.code}]", file=sys.stderr)

    if args.vectors:
        return _build_from_vectors(args, settings, started)
    if not args.input:
        raise InvalidArgument("give --input files/folders, or --vectors for precomputed multi-vectors",
                              field="input")
    sources = iter_sources(args.input, pdf_dpi=args.pdf_dpi or settings.pdf_dpi,
                           max_image_pixels=settings.max_image_pixels, max_pdf_pages=settings.max_pdf_pages)
    params = {"input": [str(p) for p in args.input], "codec": args.codec}
    if args.n_centroids:
        params["n_centroids"] = args.n_centroids
    with _registry(settings) as registry:
        outcome = build_index_from_sources(DataDir(settings.data_dir), registry, args.name, sources,
                                           encoder_dir=Path(args.encoder) if args.encoder else None,
                                           activate=not args.no_activate, pool_factor=args.pool_factor,
                                           build_params=params, progress=sys.stderr.isatty(), on_error=on_error,
                                           storage=storage_for(settings))
    s = outcome.summary
    print(f"{outcome.index}/{outcome.version} READY: {s.documents} documents, {s.tokens} tokens, "
          f"{s.centroids} centroids, built in {time.perf_counter() - started:.1f}s"
          + (f", {len(refused)} inputs skipped" if refused else "")
          + (" — now serving (stable)" if outcome.activated else " — not activated"))
    return 0


def _build_from_vectors(args: argparse.Namespace, settings, started: float) -> int:
    from colgrid_server.builder import build_index_from_vectors
    from colgrid_server.paths import DataDir
    from colgrid_server.storage import storage_for

    params = {"codec": args.codec, **({"n_centroids": args.n_centroids} if args.n_centroids else {})}
    with _registry(settings) as registry:
        outcome = build_index_from_vectors(DataDir(settings.data_dir), registry, args.name, args.vectors,
                                           normalized=not args.not_normalized, activate=not args.no_activate,
                                           build_params=params, progress=sys.stderr.isatty(),
                                           storage=storage_for(settings))
    s = outcome.summary
    print(f"{outcome.index}/{outcome.version} READY: {s.documents} documents, {s.tokens} external vectors "
          f"(dim {s.dim}), built in {time.perf_counter() - started:.1f}s; search it with query vectors"
          + (" — now serving (stable)" if outcome.activated else " — not activated"))
    return 0


def cmd_index_gc(args: argparse.Namespace) -> int:
    from colgrid_server.interrupted import collect_interrupted
    from colgrid_server.paths import DataDir

    settings = _settings(args)
    with _registry(settings) as registry:
        collected = collect_interrupted(DataDir(settings.data_dir), registry, args.name,
                                        foreign_older_than_s=args.foreign_older_than)
    for item in collected:
        print(f"{item.index}/{item.version}: FAILED ({item.reason}); removed {len(item.removed)} leftover paths")
    if not collected:
        print("no interrupted builds")
    return 0


def cmd_index_verify(args: argparse.Namespace) -> int:
    from colgrid_server.storage import storage_for

    settings = _settings(args)
    storage = storage_for(settings)  # local directories, or object storage (COLGRID_STORAGE_URL)
    with _registry(settings) as registry:
        versions = ([registry.get_version(args.name, args.version)] if args.version
                    else registry.list_versions(args.name))
    failures = 0
    for v in versions:
        if not v.storage_uri:
            # An interrupted build may have left files where it was publishing (never served).
            leftover = storage.uri_for(v.index, v.version)
            found = storage.remote and storage.has_files(leftover)
            print(f"{v.index}/{v.version}: {v.state.value}, "
                  + (f"incomplete files at {leftover} (no manifest.json: an interrupted build)" if found
                     else "no files"))
            continue
        try:
            storage.verify(v.storage_uri)
            print(f"{v.index}/{v.version}: ok ({v.storage_uri})")
        except Exception as exc:  # noqa: BLE001 - report every version, then fail
            failures += 1
            print(f"{v.index}/{v.version}: FAILED: {exc}")
    return 1 if failures else 0


# ------------------------------------------------------------------------------- registry verbs

def cmd_registry_list(args: argparse.Namespace) -> int:
    from colgrid_registry.format import format_indexes

    with _registry(_settings(args)) as registry:
        indexes = registry.list_indexes()
        print(format_indexes(indexes, {i.name: registry.get_rollout(i.name) for i in indexes}))
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from colgrid_registry.format import format_evaluations, format_version, format_versions

    with _registry(_settings(args)) as registry:
        if args.version:
            print(format_version(registry.get_version(args.name, args.version)))
            print("evaluations:")
            print(format_evaluations(registry.evaluations(args.name, args.version)))
        else:
            print(format_versions(registry.list_versions(args.name), registry.get_rollout(args.name)))
    return 0


# --------------------------------------------------------------------------------- client verbs

def cmd_search(args: argparse.Namespace) -> int:
    where = None
    if args.filter:
        try:
            where = json.loads(args.filter)
        except json.JSONDecodeError as exc:
            print(f"colgrid search: --filter is not JSON ({exc.msg} at character {exc.pos}): "
                  """pass an object such as '{"lang": "en", "year": {"gte": 2020}}'""", file=sys.stderr)
            return 2
    with connect(args) as client:
        result = client.search(args.index, args.query, k=args.k, explain=args.explain,
                               nprobe=args.nprobe, n_candidates=args.n_candidates,
                               filter=where, doc_ids=args.doc_id or None)
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
        return 0
    print(f"{result.index}@{result.version}  {len(result.hits)} hits  "
          f"({result.stats.total_ms:.1f} ms, {result.stats.candidates} candidates scored)")
    print(f"{'rank':>4}  {'score':>8}  doc")
    for hit in result.hits:
        title = hit.metadata.get("title") or ""
        print(f"{hit.rank:>4}  {hit.score:8.3f}  {hit.doc_id}" + (f"  — {title}" if title and title != hit.doc_id else ""))
        for m in hit.explanation:
            print(f"{'':16}{m.query_token!r:>18} → {m.doc_token!r:<20} [{m.start}:{m.end}]"
                  f"  sim {m.similarity:.3f}  {m.share * 100:5.1f}%")
    return 0


def _result_json(result) -> dict:
    from dataclasses import asdict

    return {"index": result.index, "version": result.version, "hits": [asdict(h) for h in result.hits]}


def cmd_encode(args: argparse.Namespace) -> int:
    with connect(args) as client:
        matrix = client.encode_query(args.index, args.text)
    print(f"{matrix.rows} × {matrix.dim} query multi-vector")
    for i, token in enumerate(matrix.tokens):
        row = matrix[i]
        print(f"{i:>3} {token!r:<16} [{', '.join(f'{x:+.3f}' for x in row[:6])}, …]")
    return 0


# ------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colgrid", description="Late-interaction (MaxSim) retrieval server.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def data_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="data directory (default ./data or $COLGRID_DATA_DIR)")
        p.add_argument("--registry", help="registry URL/path (default <data-dir>/registry.db)")

    p = verbs.add_parser("serve", help="run the gRPC server", description="Run the gRPC server.")
    data_opts(p)
    p.add_argument("--host", help="interface to bind (default localhost)")
    p.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="MaxSim device (default auto)")
    p.add_argument("--int8-screen", action="store_true", default=None,
                   help="CPU: keep an int8 copy of the tokens (x1.5 memory) for ~3x faster exact MaxSim")
    p.add_argument("--log-format", choices=["text", "json"], help="json: one object per line (default text)")
    p.add_argument("--api-keys-file", help="require API keys from this file (`colgrid keys create`)")
    p.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key serves TLS only")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) client certificates must be signed by: mutual TLS")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics on this port (default 0: off)")
    p.add_argument("--metrics-host", help="interface for metrics (default localhost)")
    p.add_argument("--max-queued-requests", type=int,
                   help="calls waiting beyond the workers before new ones are refused (default 256)")
    p.add_argument("--worker-threads", type=int, help="search/encode worker threads (default 4)")
    p.set_defaults(fn=cmd_serve)

    p = verbs.add_parser("demo", help="build the stdlib demo index if absent, then serve",
                         description="Build the Python-stdlib-docstrings demo index if absent, then serve.")
    data_opts(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--docs", type=int, default=5000, help="documents in the demo index (default 5000)")
    p.set_defaults(fn=cmd_demo)

    enc = verbs.add_parser("encoder", help="export and inspect encoders").add_subparsers(
        dest="encoder_verb", required=True, metavar="VERB")
    p = enc.add_parser("export", help="export a HF checkpoint to an ONNX encoder dir",
                       description="Export a ColBERT-style text checkpoint, or a ColQwen2/ColPali checkpoint "
                                   "(--kind), to ONNX, with a parity check against PyTorch.")
    p.add_argument("checkpoint", nargs="?", help="local checkpoint dir (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="encoder directory to create")
    p.add_argument("--kind", choices=["colbert", "colqwen2", "colpali"], default="colbert")
    p.add_argument("--base-model", help="base model dir when CHECKPOINT is a LoRA adapter")
    p.add_argument("--name", help="encoder name recorded in encoder.json")
    p.add_argument("--query-max-length", type=int, help="default 32 (text), 512 (multimodal)")
    p.add_argument("--document-max-length", type=int, help="default 256 (text), 2048 (multimodal)")
    p.add_argument("--query-marker", default="")
    p.add_argument("--document-marker", default="")
    p.set_defaults(fn=cmd_encoder_export)
    p = enc.add_parser("info", help="print an encoder dir's spec and id", description="Print encoder.json and the id.")
    p.add_argument("path")
    p.set_defaults(fn=cmd_encoder_info)
    p = enc.add_parser("publish", help="upload an encoder dir to object storage (COLGRID_STORAGE_URL)",
                       description="Upload an encoder directory to the object storage in COLGRID_STORAGE_URL, "
                                   "where servers fetch the encoders their versions pin (builds publish theirs "
                                   "on their own). A no-op when that encoder is already there.")
    p.add_argument("path")
    p.add_argument("--data-dir", help="data directory (default ./data or $COLGRID_DATA_DIR)")
    p.set_defaults(fn=cmd_encoder_publish)

    idx = verbs.add_parser("index", help="build and verify index versions").add_subparsers(
        dest="index_verb", required=True, metavar="VERB")
    p = idx.add_parser("build", help="build a new version of an index from files and folders",
                       description="Build a new immutable version of NAME from files and folders: JSONL "
                                   "({id, text, metadata?} per line), .txt/.md, images (PNG, JPEG, TIFF, WebP) "
                                   "and PDFs (one document per page). Images need a multimodal encoder.")
    p.add_argument("name")
    p.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                   help="files or folders (walked recursively); JSONL, text, images, PDFs")
    p.add_argument("--vectors", type=Path, metavar="PATH",
                   help="instead of --input: precomputed multi-vectors (a dir with tokens.npy, doc_offsets.npy, "
                        "doc_ids.json; or a .safetensors file); searched with query vectors")
    p.add_argument("--not-normalized", action="store_true",
                   help="with --vectors: the vectors are not unit length (default: they are, and it is checked)")
    p.add_argument("--encoder", help="encoder dir (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)  # kept for old scripts
    p.add_argument("--no-activate", action="store_true", help="leave the new version READY but not serving")
    p.add_argument("--codec", choices=list(CODECS), default="fp16",
                   help="token storage: fp16 (exact), int8 (1/2 the bytes), entropy4/entropy2 (at most 1/4, 1/8; "
                        "decoded at load), residual4/residual2 (1/4, 1/8; PLAID-style, can stay compressed in memory)")
    p.add_argument("--pool-factor", type=int, default=1,
                   help="image documents: pool patch vectors hierarchically by this factor (2-3 keeps ~98%% quality)")
    p.add_argument("--pdf-dpi", type=int, default=0, help="PDF rendering resolution (default: settings.pdf_dpi, 144)")
    p.add_argument("--n-centroids", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--strict", action="store_true", help="fail (build nothing) on the first input that is refused")
    data_opts(p)
    p.set_defaults(fn=cmd_index_build)
    p = idx.add_parser("gc", help="mark builds killed mid-way FAILED and remove their files",
                       description="Mark BUILDING versions whose builder process is gone FAILED (interrupted) and "
                                   "remove their temporary and unpublished directories. The server does this for "
                                   "its own host at start-up.")
    p.add_argument("name", nargs="?", help="one index (default: all)")
    p.add_argument("--foreign-older-than", type=float, metavar="SECONDS",
                   help="also collect BUILDING versions of other hosts started more than SECONDS ago")
    data_opts(p)
    p.set_defaults(fn=cmd_index_gc)
    p = idx.add_parser("verify", help="verify checksums of versions", description="Verify versions' manifests.")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    data_opts(p)
    p.set_defaults(fn=cmd_index_verify)

    reg = verbs.add_parser("registry", help="list indexes and versions").add_subparsers(
        dest="registry_verb", required=True, metavar="VERB")
    p = reg.add_parser("list", help="list indexes", description="List indexes and their serving version.")
    data_opts(p)
    p.set_defaults(fn=cmd_registry_list)
    p = reg.add_parser("show", help="show an index's versions", description="Show an index's versions, or one.")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    data_opts(p)
    p.set_defaults(fn=cmd_registry_show)

    p = verbs.add_parser("search", help="search an index on a running server",
                         description="Search an index on a running server and print a table.")
    p.add_argument("index")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--explain", action="store_true", help="show which document token each query token matched")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--n-candidates", type=int)
    p.add_argument("--filter", metavar="JSON",
                   help="""only documents whose metadata matches, e.g. '{"lang": "en", "tags": ["a", "b"], """
                        """"year": {"gte": 2020}, "draft": {"not": true}}'""")
    p.add_argument("--doc-id", action="append", metavar="ID", help="only this document (repeat for several)")
    p.add_argument("--json", action="store_true")
    client_opts(p)
    p.set_defaults(fn=cmd_search)

    p = verbs.add_parser("encode", help="encode a query on a running server",
                         description="Print the query multi-vector the server computes for TEXT.")
    p.add_argument("index")
    p.add_argument("text")
    client_opts(p)
    p.set_defaults(fn=cmd_encode)

    add_rollout_verbs(verbs, client_opts)
    add_explain_verb(verbs, client_opts)
    add_eval_verb(verbs, client_opts)
    add_ingest_verb(verbs, client_opts)
    add_keys_verbs(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        from colgrid_server.errors import ColgridError

        known = isinstance(exc, (ColgridError, OSError, LookupError, ValueError))
        try:
            from colgrid_client import ColgridError as ClientError

            known = known or isinstance(exc, ClientError)
        except ImportError:
            pass
        if not known or os.environ.get("COLGRID_DEBUG"):
            raise
        print(f"colgrid: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
