"""`mpvg cells` and `mpvg workflow ...`: the job plan that Snakemake and DVC run, as text."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from mpvg.config import add_params_arguments

    cells = subparsers.add_parser(
        "cells", help="list the cells of the grid (id, stage, tables, start point, resources)",
        description="Print every cell of the grid of params.yaml at its scale, one per line: its id, "
                    "stage, the tables and figures it feeds, the cell it starts from, and the GPUs and "
                    "minutes (SLURM runtime) its job asks for.")
    add_params_arguments(cells)
    cells.set_defaults(func=cmd_cells)

    st = subparsers.add_parser(
        "status", help="where the DAG stands: finished, running (epoch k of n), stale, pending runs per table",
        description="Read the run folders (result.json, the lock of a run being written, its metrics.jsonl) "
                    "and the rerun rule, and print per table how many runs are finished, running (with "
                    "epoch or iteration k of n and who runs it), interrupted (they resume), stale (made "
                    "with other settings; why) and pending, the GPU-hours spent and planned for the rest, "
                    "and each run's MLflow run. Safe on a login node while Snakemake runs; imports no torch.")
    add_params_arguments(st)
    st.add_argument("--all", action="store_true", help="list the finished runs too")
    st.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    st.set_defaults(func=cmd_status)

    wf = subparsers.add_parser(
        "workflow", help="the job plan behind the Snakefile and dvc.yaml",
        description="The jobs that Snakemake and DVC run, computed from params.yaml (one job per cell "
                    "and seed, plus the data, analysis and report jobs): write dvc.yaml, print the "
                    "paper-scale cost, check the inputs, list every job.")
    sub = wf.add_subparsers(dest="workflow_command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "dvc-yaml", help="write dvc.yaml from params.yaml (the same jobs as the Snakefile)",
        description="Write dvc.yaml from params.yaml: one stage per job of the plan, the same jobs, "
                    "commands and outputs as the Snakefile. With --check, only compare (exit status 1 "
                    "when --out is stale).")
    add_params_arguments(p)
    p.add_argument("--out", default="dvc.yaml", help="where to write (default: dvc.yaml)")
    p.add_argument("--check", action="store_true", help="only compare: exit 1 when --out differs")
    p.set_defaults(func=cmd_dvc_yaml)

    p = sub.add_parser("signatures", help="write each run's settings file (runs/.signatures/; DVC's first stage)",
                       description="Write <paths.runs>/.signatures/<stage>@<cell>-seed<k>.json for every run of the "
                       "plan: the settings that decide its result (its run signature without the dataset's "
                       "contents). dvc.yaml's first stage runs this; each run's stage depends on its own file, "
                       "so DVC reruns exactly the runs whose settings changed. A file whose content is "
                       "unchanged is not rewritten.")
    add_params_arguments(p)
    p.set_defaults(func=cmd_signatures)

    p = sub.add_parser("dvc-commit", help="record the finished runs in dvc.lock (after a Snakemake run)",
                       description="Run `dvc commit` for every stage whose job is current (its result follows from "
                       "the current params): afterwards `dvc status` agrees with Snakemake. The Snakefile does "
                       "it after a successful run (config dvc_commit, off in the slurm profile). Writes the "
                       "settings files first; caches the outputs as DVC does.")
    add_params_arguments(p)
    p.set_defaults(func=cmd_dvc_commit)

    p = sub.add_parser("cost", help="GPU-hours per cell at the paper (default) or budget scale (the README's cost tables)",
                       description="Planned GPU-hours per cell and seed from the recipes; the total is for --seeds N "
                                   "seeds (default: the params' seeds). --set scale=budget gives the budget scale "
                                   "and its share of one paper-scale seed.")
    add_params_arguments(p)
    p.add_argument("--by-model", action="store_true", help="one row per task and model (the README's table)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="the total for N seeds of every cell (default: len(seeds) of the params)")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser(
        "check", help="what would stop a real run: missing datasets (exit 1 if any)",
        description="List the dataset roots the grid reads at the params' scale that do not exist "
                    "(the check a real Snakemake run makes before submitting anything). Exit status 1 "
                    "if any is missing.")
    add_params_arguments(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "next", help="the next round of seeds that resolves the most claims per GPU-hour",
        description="Read the current results (this scale's, current settings only), judge every claim of "
                    "the paper with its group-sequential design, price each open claim's next round with the "
                    "cost model, and propose the seeds per cell that end the most claims per GPU-hour within "
                    "--budget. Prints the plan, its GPU-hours and the Snakemake and DVC commands that run it "
                    "(seeds_per_cell). Paper or budget scale. docs/claims.md.")
    add_params_arguments(p)
    p.add_argument("--budget", type=float, required=True, metavar="GPU_HOURS", help="GPU-hours this round may use")
    p.add_argument("--runs", default=None, metavar="DIR", help="runs folder (default: paths.runs of params)")
    p.set_defaults(func=cmd_next)

    p = sub.add_parser(
        "plan", help="every job: stage name, resources and command",
        description="Print every job of the plan, one per line: its stage name (as in dvc.yaml), its "
                    "placement (nodes x GPUs), its resources (gpu, threads, mem_mb per node, runtime in "
                    "minutes) and the command it runs.")
    add_params_arguments(p)
    p.add_argument("--node", default=None, metavar="GPUS,CPUS,MEM_MB",
                   help="the cluster's node shape (as node_gpus, node_cpus, node_mem_mb in the slurm "
                        "profile's configfile), e.g. 4,64,500000; default: one node as large as any job")
    p.set_defaults(func=cmd_plan)


def _params(args):
    from mpvg.config import ConfigError, params_from_args

    from mpvg.workflow.plan import measured_speeds

    try:
        params = params_from_args(args)
        measured_speeds(params)  # a malformed paths.measured_speeds file stops here, named
        return params
    except ConfigError as err:
        print(f"mpvg: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _node(text):
    from mpvg.workflow.plan import NodeShape

    if text is None:
        return None
    try:
        gpus, cpus, mem_mb = (int(v) for v in text.split(","))
        return NodeShape(gpus, cpus, mem_mb)
    except ValueError as err:
        print(f"mpvg: --node {text!r}: expected GPUS,CPUS,MEM_MB, three whole numbers >= 1 ({err})", file=sys.stderr)
        raise SystemExit(2) from None


def _plan(args, params=None):
    """The job plan of ``params`` (default: the params of ``args``), on ``args.node`` if given."""
    from mpvg.workflow.plan import build_plan

    try:
        return build_plan(_params(args) if params is None else params, args.params, args.overrides,
                          node=_node(getattr(args, "node", None)))
    except ValueError as err:
        print(f"mpvg: cannot place the jobs: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_next(args: argparse.Namespace) -> int:
    from mpvg.workflow.next import run_next

    params = _params(args)
    if args.budget <= 0:
        print(f"mpvg: --budget must be more than 0 GPU-hours, got {args.budget:g}", file=sys.stderr)
        return 2
    try:
        text = run_next(params, args.runs or params["paths"]["runs"], args.budget, args.params)
    except ValueError as err:
        print(f"mpvg workflow next: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def cmd_cells(args: argparse.Namespace) -> int:
    from mpvg.config import expand_cells
    from mpvg.workflow.plan import cell_resources

    params = _params(args)
    rows = [("cell", "stage", "tables", "init_from", "gpu", "runtime_min")]
    for cell in expand_cells(params).values():
        res = cell_resources(params, cell)
        rows.append((cell.id, cell.stage, ",".join(cell.tables), cell.init_from or "-", str(res["gpu"]),
                     str(res["runtime"])))
    _print_table(rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from mpvg.workflow.status import render, run_statuses

    params = _params(args)
    statuses = run_statuses(params)
    if args.json:
        for s in statuses:
            print(json.dumps(dataclasses.asdict(s)))
    else:
        print(render(params, statuses, show_all=args.all))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mpvg.workflow.plan import geometry

    for job in _plan(args):
        res = job.resources
        print(f"{job.stage_name}\t{geometry(res)}\tgpu={res['gpu']} threads={res['threads']} mem_mb={res['mem_mb']} "
              f"runtime={res['runtime']}\t{job.shell()}")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpvg.workflow.dvcyaml import render

    text = render(_plan(args), args.params)
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale: it does not match {args.params}; run `mpvg workflow dvc-yaml`",
                  file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


def _write_settings_files(params, jobs) -> None:
    """Each run's settings file (DVC's per-run dependency); one whose content is unchanged is not
    rewritten, so DVC sees no change."""
    import json
    from pathlib import Path

    from mpvg.workflow.state import run_settings

    changed = 0
    settings = run_settings(params, jobs)
    for path, value in settings.items():
        text = json.dumps(value, indent=2, sort_keys=True) + "\n"
        file = Path(path)
        if not file.is_file() or file.read_text() != text:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)
            changed += 1
    print(f"mpvg workflow signatures: {len(settings)} runs, {changed} settings file(s) changed")


def cmd_signatures(args: argparse.Namespace) -> int:
    params = _params(args)
    _write_settings_files(params, _plan(args, params))
    return 0


def cmd_dvc_commit(args: argparse.Namespace) -> int:
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from mpvg.workflow.state import job_states

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    if not Path(dvc).is_file():
        print("mpvg workflow dvc-commit: no `dvc` on PATH or beside this Python", file=sys.stderr)
        return 2
    params = _params(args)
    jobs = _plan(args, params)
    _write_settings_files(params, jobs)
    states = job_states(params, jobs)
    current = [j for j in jobs if not j.target and states[(j.rule, j.key)].current]
    done_outs = {o for j in current for o in j.outs}
    targets = [j for j in jobs if j.target and all(d in done_outs for d in j.deps)]  # their runs are done
    names = ["signatures", *(j.stage_name for j in current + targets)]
    # only what dvc.lock does not have yet (hashing every checkpoint again costs a minute at the tiny scale)
    status = subprocess.run([dvc, "status", "--json"], capture_output=True, text=True)  # all stages: fast
    if status.returncode == 0:
        changed = set(json.loads(status.stdout or "{}"))
        names = [n for n in names if n in changed]
    if not names:
        print("mpvg workflow dvc-commit: dvc.lock already records every finished run")
        return 0
    done = subprocess.run([dvc, "commit", "--force", "--quiet", *names])
    if done.returncode:
        print(f"mpvg workflow dvc-commit: dvc commit failed ({done.returncode})", file=sys.stderr)
        return done.returncode
    print(f"mpvg workflow dvc-commit: {len(names)} stages recorded in dvc.lock")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from mpvg.workflow.cost import PLANNED_SCALES, cost_table, total_gpu_hours

    if args.seeds is not None and args.seeds < 1:
        print(f"mpvg: --seeds must be at least 1, got {args.seeds}", file=sys.stderr)
        return 2
    user = list(args.overrides)
    args.overrides = ["scale=paper", *user]  # the paper scale unless --set scale=... says otherwise
    params = _params(args)
    if params["scale"] not in PLANNED_SCALES:
        print(f"mpvg: the cost table is for the {' or '.join(PLANNED_SCALES)} scale, not {params['scale']!r}",
              file=sys.stderr)
        return 2
    reference = None
    if params["scale"] != "paper":
        args.overrides = [*user, "scale=paper"]
        reference = total_gpu_hours(_params(args), seeds=1)
    print(cost_table(params, by_model=args.by_model, seeds=args.seeds, reference=reference))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mpvg.workflow.preflight import problems

    found = problems(_params(args))
    for line in found:
        print(f"missing: {line}", file=sys.stderr)
    if not found:
        print("all inputs present")
    return 1 if found else 0


def _print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
