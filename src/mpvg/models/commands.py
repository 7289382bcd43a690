"""``mpvg params`` and ``mpvg models`` (argparse only at import time; torch/timm in handlers)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="#Params of every cell of Tables 1 and 2, counted from the built models",
        description="Build every model x method of Tables 1 and 2 (on the meta device) and print "
        "its parameter count beside the paper's figure and whether floor(count/1e3)/1e3 matches. "
        "Exit status 1 if a cell mismatches without a documented exception (docs/models.md).",
    )
    p.add_argument("--json", action="store_true",
                   help='print a JSON array of {"table", "model", "method", "params"}')
    p.add_argument("--table", type=int, choices=(1, 2), action="append",
                   help="only this table (repeatable; default: both)")
    p.set_defaults(func=_params)

    m = subparsers.add_parser(
        "models",
        help="list the registered mpvg models (timm names) and their paper names",
        description="List the timm names of the models registered by mpvg.models.",
    )
    m.add_argument("--methods", action="store_true", help="list every model x PE method pair")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=_models)


def _params(args) -> int:
    import json
    import sys

    from .params import format_table, params_table, undocumented_mismatches

    rows = params_table(tuple(args.table or (1, 2)))
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=1))
    else:
        print(format_table(rows))
    bad = undocumented_mismatches(rows)
    for r in bad:
        print(f"error: table {r.table} {r.model} {r.method}: {r.params} does not match the paper's "
              f"{r.paper_m:.3f}M", file=sys.stderr)
    return 1 if bad else 0


def _models(args) -> int:
    import json

    from .registry import PAPER_MODELS, list_model_methods, registered_models

    names = registered_models()
    paper = {v: k for k, v in PAPER_MODELS.items()}
    if args.methods:
        pairs = list_model_methods()
        if args.json:
            print(json.dumps([p._asdict() for p in pairs], indent=1))
        else:
            for p in pairs:
                print(f"{p.model:<10} {p.method:<8} {p.timm_name} pe_method={p.pe_method}")
        return 0
    if args.json:
        print(json.dumps([{"timm_name": n, "paper_name": paper.get(n)} for n in names], indent=1))
    else:
        for n in names:
            print(f"{n:<36} {paper.get(n, '')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="mpvg")
    register(parser.add_subparsers())
    a = parser.parse_args()
    raise SystemExit(a.func(a))
