"""Checks made before a real run submits anything (the Snakefile's ``onstart``, `mpvg workflow check`)."""
from __future__ import annotations

from typing import Mapping, Sequence

from mpvg.workflow.plan import missing_inputs

PROFILE = "slurm/config.v8+.yaml"


def problems(params: Mapping, slurm_rules_without_partition: Sequence[str] = ()) -> list[str]:
    """What stops a real run, one line each naming the missing thing and where to fix it."""
    out = [f"dataset {item} does not exist (set datasets.<name>.root in params.yaml, or `dvc pull` it; "
           "`mpvg data check` tells more)" for item in missing_inputs(params)]
    if slurm_rules_without_partition:
        out.append(
            "no SLURM partition for rule(s) " + ", ".join(slurm_rules_without_partition)
            + f": set `slurm_partition` under default-resources in {PROFILE} "
            "(or pass --default-resources slurm_partition=NAME)")
    return out
