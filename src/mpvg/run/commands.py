"""Command-line pieces both training commands share (``mpvg train`` and ``mpvg detect|segment
train``): their common arguments, the start point's expected signature, the tracking settings and
the exit codes a training job's outcome maps to (argparse only at import time)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpvg.run import REQUEUE_EXIT_CODE


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA when the recipe says amp, none on CPU)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: the recipe's)")


def seed_type(text: str) -> int:
    """argparse type of ``--seed``: a non-negative integer (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def add_on_change_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-change", choices=("set-aside", "fail"), default="set-aside",
                   help="when OUT holds a run of other settings (its signature differs): move it to "
                   "OUT/previous/<time>/ and start fresh (set-aside, the default) or stop (fail)")
    p.add_argument("--retrain", action="store_true",
                   help="move whatever OUT holds to OUT/previous/<time>/ and train from scratch, also a "
                   "finished run of these settings (Snakemake's --forceall / -R / --forcerun pass it)")


def start_point_expectation(params, spec, seed: int, path) -> dict | None:
    """The signature inputs the start point of ``spec`` must have, when ``path`` is the checkpoint of
    its planned start cell (same seed); None for any other file (official weights, a user's file)."""
    from mpvg.signature import expected_inputs

    if spec.cell.init_from is None or path is None:
        return None
    planned = spec.init_checkpoint(seed)
    if planned is None or Path(path).resolve() != planned.resolve():
        return None
    return expected_inputs(params, spec.cell.init_from, seed)


def fail(command: str, err: BaseException, code: int = 2) -> int:
    print(f"mpvg {command}: error: {err}", file=sys.stderr)
    return code


def expected_errors() -> tuple[type[BaseException], ...]:
    from mpvg.config import ConfigError
    from mpvg.data import DatasetError

    from mpvg.run.folder import RunLockedError

    return ConfigError, DatasetError, FileNotFoundError, FileExistsError, ValueError, RunLockedError


def tracking_settings(args, params) -> tuple[str, str]:
    from mpvg.runinfo import project_root
    from mpvg.tracking import experiment_name, resolve_tracking_uri

    return resolve_tracking_uri(params, project_root(Path(args.params).resolve().parent)), experiment_name(params)


def run_training_job(command: str, job) -> int:
    """Run ``job()`` (a training job of ``mpvg train`` or ``mpvg detect|segment train``) and turn
    its outcome into the exit code the workflow acts on: 0 done, REQUEUE_EXIT_CODE preempted after
    a checkpoint, 1 non-finite loss or a run-folder file that could not be written (full disk), 2 bad
    config/data/arguments."""
    from mpvg.run.folder import NonFiniteLossError, Preempted, RunWriteError

    try:
        job()
    except Preempted as err:
        print(f"mpvg {command}: {err}; exit {REQUEUE_EXIT_CODE} (requeue): the same command resumes it",
              file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except (NonFiniteLossError, RunWriteError) as err:
        return fail(command, err, 1)
    except KeyboardInterrupt:
        print(f"mpvg {command}: interrupted (second Ctrl-C); the last checkpoint on disk is kept", file=sys.stderr)
        return 130
    except expected_errors() as err:
        return fail(command, err)
    return 0
