"""``mpvg train``, ``mpvg eval`` and ``mpvg tracking {init,sync}`` (argparse only at import time).

Exit codes of ``mpvg train``: 0 finished (result.json written); 1 the loss became NaN/inf
(last good checkpoint kept), a run-folder file that could not be written (full disk; the file
before is kept) or an unexpected error; 2 bad configuration, data or arguments;
75 (``mpvg.run.REQUEUE_EXIT_CODE``, EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after saving a
checkpoint: requeue the job and the same command resumes it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpvg.run import REQUEUE_EXIT_CODE
from mpvg.run.commands import (add_device_arguments, add_on_change_argument, expected_errors, fail,
                                 run_training_job, seed_type, start_point_expectation, tracking_settings)


def register(subparsers) -> None:
    from mpvg.config import add_params_arguments

    p = subparsers.add_parser(
        "train", help="train one classification cell for one seed (resumable; `mpvg launch` for several GPUs)",
        description="Train one classification cell of params.yaml for one seed with the recipe of its "
        "scale. Resumes automatically from OUT/checkpoint.pt; writes OUT/result.json last. Multi-GPU: "
        "mpvg launch --nproc-per-node G train ... (the recipe's batch_size is global). "
        f"Exit codes: 0 done, 1 non-finite loss or crash, 2 bad config/data, {REQUEUE_EXIT_CODE} "
        "preempted (SIGTERM/SIGUSR1; checkpoint saved, requeue).")
    add_params_arguments(p)
    p.add_argument("--cell", required=True, help="cell id, e.g. in1k-deit_ti-mpvg (`mpvg cells` lists them)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of everything random (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default: <paths.runs>/<stage>/<cell>/seed<k>)")
    p.add_argument("--init-from", type=Path, default=None, metavar="CKPT",
                   help="start from these weights (PE resized, head of another size dropped); "
                   "needed by fine-tuning cells")
    add_device_arguments(p)
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the training step: auto (default) compiles on CUDA where `make gpu-check` "
                   "found it correct and faster for the model (paths.measured_speeds), on (also plain --compile), off")
    p.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                   help="fused AdamW: auto (default) on CUDA, on, off")
    p.add_argument("--no-resume", action="store_true", help="fail if OUT/checkpoint.pt exists instead of resuming")
    add_on_change_argument(p)
    p.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate every N epochs (0: only after the last; default 1)")
    p.add_argument("--log-interval", type=int, default=20, metavar="STEPS",
                   help="steps between loss checks / progress updates (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are off when stderr is not a TTY)")
    p.add_argument("--no-tracking", action="store_true", help="no MLflow (OUT/metrics.jsonl is still written)")
    p.add_argument("--log-checkpoint", action="store_true",
                   help="upload checkpoint.pt to MLflow (default: only its path, in the model card)")
    p.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="top-1/top-5/loss of a checkpoint on a cell's validation set",
                              description="Evaluate a checkpoint on the validation split of a cell's dataset; "
                              "prints JSON and writes it to --out.")
    add_params_arguments(e)
    e.add_argument("--cell", required=True, help="cell id (gives the model, dataset and eval transform)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="checkpoint.pt of `mpvg train`, or a state dict")
    src.add_argument("--weights", type=Path, metavar="FILE",
                     help="an official checkpoint of the cell's Default model in its original code base's layout "
                     "(DeiT, T2T-ViT-7, CeiT-Ti, Swin-T; docs/models.md); the result goes to "
                     "<paths.runs>/calibration/<cell>/result.json unless --out, for the report's calibration table")
    e.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the metrics JSON here")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    add_device_arguments(e)
    e.set_defaults(func=_eval)

    la = subparsers.add_parser(
        "launch", help="run a training command in N processes on this node (preemption-safe torchrun)",
        description="Start `python -m mpvg COMMAND ...` in N processes with torchrun's environment (RANK, "
        "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), forward SIGTERM/SIGUSR1/SIGINT to all of them, stop the "
        "others when one fails, and exit 0 when all finished, "
        f"{REQUEUE_EXIT_CODE} when they stopped on a signal after saving a checkpoint (requeue), else the "
        "failing worker's code. The Snakefile uses it for jobs with more than one GPU. Example: "
        "mpvg launch --nproc-per-node 4 train --cell in1k-deit_ti-mpvg --seed 0")
    la.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", type=int, required=True, metavar="N",
                    help="processes to start (one per GPU)")
    la.add_argument("--grace", type=float, default=60.0, metavar="S",
                    help="seconds the other workers get to save after one failed, before SIGKILL (default 60)")
    la.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="an mpvg sub-command and its arguments")
    la.set_defaults(func=_launch)

    t = subparsers.add_parser("tracking", help="MLflow store: create it before parallel jobs, complete runs that "
                              "lost their server",
                              description="Where runs are tracked: $MLFLOW_TRACKING_URI, else tracking.uri of "
                              "params.yaml, else sqlite:///<project root>/mlruns.db. Experiments: "
                              "<tracking.experiment> (report and analysis runs) and <tracking.experiment>/<task> "
                              "(training runs of in1k, c100, coco, ade20k).")
    add_params_arguments(t)
    tsub = t.add_subparsers(dest="tracking_command", metavar="ACTION", required=True)
    ti = tsub.add_parser("init", help="create the store and the experiments once (run before parallel jobs)",
                         description="Create the MLflow store (a SQLite schema is created once, under a lock) and "
                         "the project's experiments where missing: <experiment> and <experiment>/<task> for every "
                         "task, in that order (on a fresh store ids 1-5, the README's links), each of the kind "
                         "MLflow's UI opens on its runs table. The workflow runs it before the first job. A server "
                         "that does not answer within 2 s is an error naming it.")
    ti.set_defaults(func=_tracking_init)
    ts = tsub.add_parser("sync", help="complete run folders' MLflow runs from their metrics.jsonl",
                         description="For each RUN_DIR, complete the MLflow run of the job from RUN_DIR/metrics.jsonl "
                         "(the journal every job writes): a run cut off by a dying or silent server (left RUNNING) "
                         "gets the tags, params, metric values (by key and step), artifacts and final status it "
                         "lacks, under its own run id; a job that never reached MLflow gets a new run, whose id is "
                         "written into result.json and the journal. Running it again sends nothing new.")
    ts.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ts.add_argument("--force", action="store_true",
                    help="upload the journal as a second, new MLflow run even when the job's run exists")
    ts.set_defaults(func=_tracking_sync)


def _train(args) -> int:
    from mpvg.config import params_from_args, resolve_run
    from mpvg.run.loop import RunOptions
    from mpvg.training.engine import train

    def job():
        from mpvg.training.gpu_defaults import compile_verdict
        from mpvg.workflow.plan import measured_speeds

        params = params_from_args(args)
        spec = resolve_run(params, args.cell)
        uri, experiment = tracking_settings(args, params)
        opts = RunOptions(
            out_dir=args.out or spec.run_dir(args.seed), seed=args.seed, device=args.device, amp=args.amp,
            compile=args.compile, fused=args.fused,
            compile_verdict=compile_verdict(measured_speeds(params), spec.cell.model), init_from=args.init_from,
            init_expected=start_point_expectation(params, spec, args.seed, args.init_from),
            resume=not args.no_resume, on_change=args.on_change, retrain=args.retrain, quiet=args.quiet,
            eval_every=args.eval_every, num_workers=args.workers, log_interval=max(1, args.log_interval),
            log_checkpoint=args.log_checkpoint, tracking_uri=None if args.no_tracking else uri, experiment=experiment)
        train(spec, opts)

    return run_training_job("train", job)


def _launch(args) -> int:
    from mpvg.run.launch import launch

    if not args.argv:
        print("mpvg launch: error: name the mpvg sub-command to run, e.g. `mpvg launch --nproc-per-node 2 train "
              "--cell CELL`", file=sys.stderr)
        return 2
    try:
        return launch(args.nproc, args.argv, grace=args.grace)
    except ValueError as err:
        return fail("launch", err)


def _eval(args) -> int:
    from mpvg.config import params_from_args, resolve_run
    from mpvg.run.layout import RESULT
    from mpvg.runinfo import write_json_atomic
    from mpvg.training.engine import evaluate_checkpoint

    try:
        spec = resolve_run(params_from_args(args), args.cell)
        official = args.weights is not None
        result = evaluate_checkpoint(spec, args.weights if official else args.checkpoint, args.device, args.amp,
                                     args.ema, args.workers, official=official)
    except expected_errors() as err:
        return fail("eval", err)
    print(json.dumps(result, indent=2))
    out = args.out
    if out is None and official:
        out = spec.runs_root / "calibration" / spec.cell.id / RESULT  # docs/contracts.md
    if out is not None:
        write_json_atomic(out, result)
    return 0


def _tracking_init(args) -> int:
    from mpvg.config import params_from_args
    from mpvg.tracking import init_store

    try:
        uri, experiment = tracking_settings(args, params_from_args(args))
        exp_id = init_store(uri, experiment)
    except (*expected_errors(), RuntimeError) as err:  # TrackingError: a store that cannot be used
        return fail("tracking init", err)
    print(f"tracking store {uri}: experiment {experiment!r} (id {exp_id}) ready")
    return 0


def _tracking_sync(args) -> int:
    from mpvg.config import params_from_args
    from mpvg.tracking import sync

    try:
        uri, experiment = tracking_settings(args, params_from_args(args))
        for run_dir in args.run_dirs:
            print(f"{run_dir}: uploaded as MLflow run {sync(run_dir, uri, experiment, args.force)} to {uri}")
    except (*expected_errors(), RuntimeError) as err:
        return fail("tracking sync", err)
    return 0
