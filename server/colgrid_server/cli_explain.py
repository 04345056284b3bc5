"""`colgrid explain INDEX DOC_ID QUERY`: why a document scored what it did for a query, through a
running server (the SDK's `explain`): one row per query token with its best document token (a
page: the patch's grid cell and pixel box; text: the token and its character span), similarity
and share of the score; with --out, a heatmap PNG of the page (image documents only).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from colgrid_server.cli_client import connect


def add_explain_verb(verbs: argparse._SubParsersAction, client_opts) -> None:
    p = verbs.add_parser("explain", help="show why a document matched a query; heatmap PNG for pages",
                         description="Explain DOC_ID's score for QUERY on a running server: each query token's "
                                     "best document token (pages: patch row/col and pixel box), its similarity "
                                     "and share of the score. --out writes a heatmap of the page.")
    p.add_argument("index")
    p.add_argument("doc_id", metavar="DOC_ID", help="the document, as a search hit names it (a PDF page: FILE#pN)")
    p.add_argument("query")
    p.add_argument("--token", type=int, metavar="N",
                   help="map query token N only (0-based, as listed); default: all tokens, summed")
    p.add_argument("--out", type=Path, metavar="PNG", help="write the heatmap over the page here (image documents)")
    p.add_argument("--alpha", type=float, default=0.5, help="heat opacity over the page, 0..1 (default 0.5)")
    p.add_argument("--version", help="a version loaded on the server (default: the one routing picks)")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON (patch scores included)")
    client_opts(p)
    p.set_defaults(fn=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:

    with connect(args) as client:
        explanation = client.explain(args.index, args.doc_id, args.query, query_token=args.token,
                                     render=args.out is not None, version=args.version, alpha=args.alpha)
    if args.json:
        print(json.dumps(explanation_json(explanation), indent=2))
    else:
        print(format_explanation(explanation))
    if args.out is None:
        return 0
    if not explanation.heatmap_png:
        print(f"colgrid: error: {explanation.doc_id} is a text document: no heatmap written to {args.out}",
              file=sys.stderr)
        return 1
    explanation.save_heatmap(args.out)
    print(f"heatmap written to {args.out} ({explanation.width}x{explanation.height})", file=sys.stderr)
    return 0


def explanation_json(explanation: Any) -> dict[str, Any]:
    data = asdict(explanation)
    data.pop("heatmap_png")
    return data


def format_explanation(e: Any) -> str:
    """A header (document, kind, grid, score), then one row per query token."""
    if e.kind == "image" and e.grid is not None:
        shape = f"image, {e.grid[0]}x{e.grid[1]} patches, {e.width}x{e.height} px"
    else:
        shape = "text"
    mapped = "all tokens summed" if e.query_token is None else f"token {e.query_token}"
    header = f"{e.index}@{e.version}  {e.doc_id}  ({shape})  score {e.score:.4f}"
    if e.kind == "image":
        header += f"  map: {mapped}"
        headers = ["TOKEN", "QUERY TOKEN", "PATCH (ROW, COL)", "BOX (X0, Y0, X1, Y1)", "SIM", "SHARE"]
        rows = [[_position(m, e), repr(m.query_token),
                 f"({m.patch.row}, {m.patch.col})" + (f" +{len(m.pooled)} pooled" if m.pooled else "")
                 if m.patch else "-",
                 "({}, {}, {}, {})".format(*m.patch.box) if m.patch else "-",
                 f"{m.similarity:.4f}", f"{m.share * 100:.1f}%"] for m in e.matches]
    else:
        headers = ["TOKEN", "QUERY TOKEN", "DOC TOKEN", "SPAN", "SIM", "SHARE"]
        rows = [[_position(m, e), repr(m.query_token), repr(m.doc_token),
                 f"[{m.start}:{m.end}]" if m.start >= 0 else "-", f"{m.similarity:.4f}", f"{m.share * 100:.1f}%"]
                for m in e.matches]
    return "\n".join([header, *_table(headers, rows)])


def _position(match: Any, e: Any) -> str:
    return f"{match.query_index}" + ("*" if e.query_token == match.query_index else "")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned text columns, right-aligned numbers (the last two)."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    numeric = {0, len(headers) - 2, len(headers) - 1}
    return ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in [headers, *rows]]
