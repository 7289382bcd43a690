# mpvg: every result of the paper as one Snakemake DAG (docs/workflow.md).
#
#   snakemake --cores 2                  the whole DAG at the scale of params.yaml (tiny: CPU, minutes)
#   snakemake -n --profile slurm         plan the paper scale on a SLURM cluster (dry run)
#   snakemake --profile slurm            run it (set partition/account in slurm/config.v8+.yaml)
#
# params.yaml is the single source of truth for the grid; the jobs come from
# mpvg.workflow.plan, which also writes dvc.yaml, so both describe the same DAG.
from snakemake.utils import min_version, validate

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/steps.smk"
include: "workflow/rules/cells.smk"


localrules:
    all,


rule all:
    input:
        wf.targets(P),
    default_target: True
