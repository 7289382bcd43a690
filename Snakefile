# mpvg: every result of the paper as one Snakemake DAG (docs/workflow.md).
#
#   snakemake --cores 2                  the whole DAG at the scale of params.yaml (tiny: CPU, minutes)
#   snakemake --cores 2 table2           only what Table 2 needs (also table1..table6, figure1,
#                                        figure5, figures, downstream)
#   snakemake -n --profile slurm         plan the paper scale on a SLURM cluster (dry run)
#   snakemake --profile slurm            run it (set partition/account in slurm/config.v8+.yaml)
#
# params.yaml is the single source of truth for the grid; the jobs come from
# mpvg.workflow.plan, which also writes dvc.yaml, so both describe the same DAG. Which jobs run
# is the rerun rule of mpvg.workflow.state (common.smk): missing or stale results, and everything
# downstream of them; file times never matter.
from snakemake.utils import min_version, validate

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/steps.smk"
include: "workflow/rules/cells.smk"


localrules:
    all,


rule all:
    input:
        wf.targets(P),
        upstream_markers(wf.targets(P)),
    default_target: True
