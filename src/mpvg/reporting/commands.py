"""``mpvg report``: rebuild every table under reports/ from the finished runs."""
from __future__ import annotations

import argparse

TABLE_KEYS = ("T1", "T2", "T3", "T4", "T5", "T6", "F1", "F5")


def register(subparsers) -> None:
    from mpvg.config import add_params_arguments

    p = subparsers.add_parser(
        "report", help="write the paper's tables (Markdown + LaTeX) from runs/**/result.json",
        description="Tables 1-6, the Figure 1/5 comparisons and a cost table, each reproduced number "
                    "beside the paper's; unfinished cells show 'pending'. Writes OUT/README.md as the index.")
    add_params_arguments(p)
    p.add_argument("--runs", default=None, metavar="DIR", help="runs folder (default: paths.runs of params)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: paths.reports of params)")
    p.add_argument("--only", action="append", default=None, metavar="TABLE", choices=TABLE_KEYS,
                   help="rewrite only this table's files (T1..T6, F1, F5; repeatable), e.g. for `snakemake table2`")
    p.set_defaults(func=run_report)


def planned_gpu_hours(params: dict, cells: dict):
    """cell -> GPU-hours of one seed from the workflow's cost model (paper and budget scales; None
    at the tiny scale). The claims page prices each claim's next round with it."""
    from mpvg.workflow.cost import PLANNED_SCALES
    from mpvg.workflow.plan import paper_gpu_hours

    if params["scale"] not in PLANNED_SCALES:
        return None
    return {cid: paper_gpu_hours(params, cell) for cid, cell in cells.items()}


def report_inputs(params: dict, cells: dict, runs) -> dict:
    """What the report needs from the workflow, as plain data, the keyword arguments of
    :func:`mpvg.reporting.report.build_reports` (the reporting package does not import the
    workflow, docs/contracts.md "Layers"): ``current``, the runs whose result follows from the
    current params (the rerun rule, mpvg.workflow.state.current_runs); ``seen``, the signatures of
    the runs read, for build.json; ``planned``, the cost model's rows per task and model (None at
    the tiny scale); ``gpu_hours``, :func:`planned_gpu_hours`."""
    from mpvg.workflow.cost import PLANNED_SCALES, cost_rows, rows_by_model
    from mpvg.workflow.state import current_runs, seen_record

    planned = rows_by_model(cost_rows(params)) if params["scale"] in PLANNED_SCALES else None
    return {"current": current_runs(params, runs), "seen": seen_record(params, "report", runs),
            "planned": planned, "gpu_hours": planned_gpu_hours(params, cells)}


def run_report(args: argparse.Namespace) -> int:
    from mpvg.config import expand_cells, params_from_args
    from mpvg.reporting.report import build_reports

    params = params_from_args(args)
    runs = args.runs or params["paths"]["runs"]
    out = args.out or params["paths"]["reports"]
    cells = expand_cells(params)
    written = build_reports(params, cells, runs, out, params_path=args.params, only=args.only,
                            **report_inputs(params, cells, runs))
    if args.only:
        print(f"mpvg report: wrote {', '.join(str(p) for p in written)}")
    else:
        from mpvg.tracking import log_report

        # the tables as artifacts of one MLflow run, the claims' verdict counts as its metrics and
        # one nested run per claim with its difference, CI and verdict (a failing store: a warning)
        log_report(params, written.metrics, written, children=written.children)
        print(f"mpvg report: wrote {len(written)} files to {out} (index: {out}/README.md)")
    return 0
