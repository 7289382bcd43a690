"""``mpvg analyze``: the analysis figures and analysis.json from trained checkpoints."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from mpvg.config import add_params_arguments

    p = subparsers.add_parser(
        "analyze", help="draw Figures 2, 4, 6, 7, 8 from checkpoints (PNG + PDF) and analysis.json",
        description="Runs each needed checkpoint on a fixed batch of validation images; a missing "
                    "checkpoint leaves its panel out (noted in analysis.json), a figure with no input "
                    "is written as a 'pending' placeholder.")
    add_params_arguments(p)
    p.add_argument("--runs", default=None, metavar="DIR", help="runs folder (default: paths.runs of params)")
    p.add_argument("--out", default=None, metavar="DIR", help="figure folder (default: <paths.reports>/figures)")
    p.add_argument("--seed", type=int, default=None, help="use this seed's checkpoints (default: first seed found)")
    p.add_argument("--batch-size", type=int, default=64, help="validation images averaged over (default: 64)")
    p.add_argument("--samples", type=int, default=4, help="images shown in Figure 7 (default: 4)")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpvg.analysis.analyze import run_analysis, write_summary
    from mpvg.analysis.extract import checkpoint_analyzer
    from mpvg.config import expand_cells, params_from_args

    params = params_from_args(args)
    runs = Path(args.runs or params["paths"]["runs"])
    out = Path(args.out or Path(params["paths"]["reports"]) / "figures")
    analyzer = checkpoint_analyzer(params, args.batch_size, args.samples)
    result = run_analysis(params, expand_cells(params), runs, out, analyzer, seed=args.seed, samples=args.samples)
    write_summary(result, out, params)
    # the runs these figures were drawn from, by run signature (the workflow's rerun rule reads it)
    import json

    from mpvg.workflow.state import seen_record

    record = out / "analysis.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), **seen_record(params, "analyze", runs)},
                                 indent=2, sort_keys=True) + "\n")
    states = ", ".join(f"{k}: {v['status']}" for k, v in result["figures"].items())
    print(f"mpvg analyze: {states}; wrote {out}/analysis.json")
    return 0
