"""`colgrid eval INDEX QUERIES.jsonl`: run a judged query set on one or two versions of an index
through a running server (the SDK's `evaluate`) and print their scores side by side.

QUERIES is a query-set JSONL file (one `{"query_id", "query", "relevant": {doc_id: gain}}` per
line), or with --qrels a BEIR `queries.jsonl` whose judgements come from the qrels file.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from colgrid_server.cli_client import connect

EVAL_TIMEOUT_S = 600.0  # an evaluation runs every query on every version: longer than a search


def add_eval_verb(verbs: argparse._SubParsersAction, client_opts) -> None:
    p = verbs.add_parser("eval", help="score versions of an index on judged queries",
                         description="Run judged queries on one or two versions of INDEX on a running server and "
                                     "print nDCG@10, recall@k, MRR@10 and latency percentiles per version.")
    p.add_argument("index")
    p.add_argument("queries", metavar="QUERIES", help="query-set JSONL: one {query_id, query, relevant: {doc_id: "
                                                      "gain}} per line (with --qrels: BEIR queries.jsonl)")
    p.add_argument("--qrels", help="BEIR qrels TSV (query-id, corpus-id, score) or TREC qrels for QUERIES")
    p.add_argument("--version", dest="versions", action="append", default=[], metavar="VERSION",
                   help="a version to evaluate; twice to compare two (default: stable, and the canary if any)")
    p.add_argument("-k", "--k", type=int, default=100, help="recall cut-off (default 100)")
    p.add_argument("--record", action="store_true",
                   help="store the results on the versions in the registry (promote policies read them)")
    p.add_argument("--query-set", default="", metavar="NAME",
                   help="name recorded with the results (default: a digest of the judged queries)")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--n-candidates", type=int)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    client_opts(p)
    p.set_defaults(fn=cmd_eval, timeout=EVAL_TIMEOUT_S)


def cmd_eval(args: argparse.Namespace) -> int:
    from colgrid_server.evaluation import read_beir, read_query_set

    judged = read_beir(args.queries, args.qrels) if args.qrels else read_query_set(args.queries)
    queries = [{"query_id": q.query_id, "query": q.text, "relevant": dict(q.relevance)} for q in judged]
    with connect(args) as client:
        results = client.evaluate(args.index, queries, versions=args.versions or None, k=args.k,
                                  query_set=args.query_set, record=args.record, nprobe=args.nprobe,
                                  n_candidates=args.n_candidates)
    if args.json:
        print(json.dumps({"index": args.index, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_results(args.index, results, recorded=args.record))
    return 0


def format_results(index: str, results: Sequence[Any], *, recorded: bool = False) -> str:
    """A header naming the query set, then one row per version."""
    if not results:
        return f"{index}: no versions evaluated"
    first = results[0]
    k = first.k
    lines = [f"{index}: query set {first.query_set!r}, {first.queries} queries"
             + (" (recorded in the registry)" if recorded else "")]
    headers = ["VERSION", "nDCG@10", f"RECALL@{k}", "MRR@10", "P50 MS", "P95 MS", "P99 MS", "MISSING"]
    rows = [[r.version, f"{r.ndcg_at_10:.3f}", f"{r.recall_at_k:.3f}", f"{r.mrr_at_10:.3f}",
             f"{r.latency_p50_ms:.1f}", f"{r.latency_p95_ms:.1f}", f"{r.latency_p99_ms:.1f}",
             str(r.judged_missing)] for r in results]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if any(r.judged_missing for r in results):
        lines.append("MISSING: judged relevant documents the version does not contain (they count as not found)")
    return "\n".join(lines)
