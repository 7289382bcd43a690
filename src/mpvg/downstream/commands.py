"""``mpvg detect {train,eval}`` and ``mpvg segment {train,eval}`` (argparse only at import time).

Exit codes of ``train``: 0 finished (result.json written); 1 non-finite loss; 2 bad
configuration, data, checkpoint or arguments; ``REQUEUE_EXIT_CODE`` stopped by
SIGTERM/SIGUSR1 after saving a checkpoint (the same command resumes).
"""
from __future__ import annotations

import json
from pathlib import Path

from mpvg.run import REQUEUE_EXIT_CODE

TASKS = {
    "detect": ("COCO instance segmentation with Mask R-CNN", "coco-deit_ti-mpvg", "box/mask AP", "Table 3"),
    "segment": ("ADE20K semantic segmentation with UperNet", "ade20k-deit_ti-mpvg", "mIoU", "Table 4"),
}


def register(subparsers) -> None:
    from mpvg.config import add_params_arguments
    from mpvg.run.commands import add_device_arguments, add_on_change_argument, seed_type

    for task, (what, example, metric, table) in TASKS.items():
        top = subparsers.add_parser(task, help=f"{what} on a ViT-Adapter-Ti of each PE method ({table})",
                                    description=f"{what} on ViT-Adapter-Ti around the DeiT-Ti of a PE method.")
        sub = top.add_subparsers(dest=f"{task}_command", metavar="ACTION", required=True)

        t = sub.add_parser("train", help=f"fine-tune one {task} cell for one seed (resumable; `mpvg launch` for several GPUs)",
                           description=f"Fine-tune cell CELL (e.g. {example}) from its ImageNet checkpoint; "
                           "resumes from OUT/checkpoint.pt; writes OUT/result.json last with the "
                           f"{metric}. Multi-GPU: mpvg launch --nproc-per-node G {task} train ... "
                           f"Exit codes: 0 done, 1 non-finite loss, 2 bad config/data, {REQUEUE_EXIT_CODE} "
                           "preempted (checkpoint saved; requeue).")
        add_params_arguments(t)
        t.add_argument("--cell", required=True, help=f"cell id, e.g. {example}")
        t.add_argument("--seed", type=seed_type, default=0, help="seed (also picks the pretrained seed; default 0)")
        t.add_argument("--out", type=Path, default=None, help="run folder (default <paths.runs>/<stage>/<cell>/seed<k>)")
        t.add_argument("--init-from", "--pretrained", dest="init_from", type=Path, default=None, metavar="CKPT",
                       help="ImageNet checkpoint of the cell's PE method (default: "
                       "<paths.runs>/train/<init_from cell>/seed<k>/checkpoint.pt)")
        add_device_arguments(t)
        t.add_argument("--no-resume", action="store_true", help="fail if OUT/checkpoint.pt exists")
        add_on_change_argument(t)
        t.add_argument("--eval-every", "--eval-interval", dest="eval_every", type=int, default=None, metavar="ITERS",
                       help="evaluate every ITERS iterations (0: only at the end; default: the recipe's)")
        t.add_argument("--log-interval", type=int, default=20, metavar="ITERS", help="iterations between loss logs")
        t.add_argument("--quiet", action="store_true", help="no progress bars")
        t.add_argument("--no-tracking", action="store_true", help="no MLflow (OUT/metrics.jsonl is still written)")
        t.set_defaults(func=_train, task=task)

        e = sub.add_parser("eval", help=f"{metric} of a `mpvg {task} train` checkpoint",
                           description=f"Evaluate a `mpvg {task} train` checkpoint on the validation split; prints "
                           "JSON and writes it to --out.")
        add_params_arguments(e)
        e.add_argument("--cell", required=True, help=f"cell id, e.g. {example}")
        e.add_argument("--checkpoint", required=True, type=Path, help=f"checkpoint.pt of `mpvg {task} train`")
        e.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the metrics JSON here")
        e.add_argument("--quiet", action="store_true", help="no progress bar")
        add_device_arguments(e)
        e.set_defaults(func=_eval, task=task)


def _train(args) -> int:
    from mpvg.config import params_from_args, resolve_run
    from mpvg.downstream.engine import train
    from mpvg.run.commands import run_training_job, start_point_expectation, tracking_settings
    from mpvg.run.loop import RunOptions

    def job():
        params = params_from_args(args)
        spec = resolve_run(params, args.cell)
        uri, experiment = tracking_settings(args, params)
        opts = RunOptions(
            out_dir=args.out or spec.run_dir(args.seed), seed=args.seed, device=args.device, amp=args.amp,
            init_from=args.init_from,
            init_expected=start_point_expectation(params, spec, args.seed,
                                                  args.init_from or spec.init_checkpoint(args.seed)),
            resume=not args.no_resume, on_change=args.on_change, retrain=args.retrain, quiet=args.quiet,
            num_workers=args.workers,
            log_interval=max(1, args.log_interval), eval_every=args.eval_every,
            tracking_uri=None if args.no_tracking else uri, experiment=experiment)
        train(spec, args.task, opts)

    return run_training_job(f"{args.task} train", job)


def _eval(args) -> int:
    from mpvg.config import params_from_args, resolve_run
    from mpvg.downstream.engine import evaluate_checkpoint
    from mpvg.runinfo import write_json_atomic
    from mpvg.run.commands import expected_errors, fail

    try:
        spec = resolve_run(params_from_args(args), args.cell)
        result = evaluate_checkpoint(spec, args.task, args.checkpoint, args.device, args.amp, args.workers,
                                     quiet=args.quiet)
    except expected_errors() as err:
        return fail(f"{args.task} eval", err)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        write_json_atomic(args.out, result)
    return 0
