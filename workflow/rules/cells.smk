# One rule per kind of job of a cell: ImageNet/CIFAR training from scratch (train), fine-tuning
# from an ImageNet checkpoint (finetune), COCO detection (detect), ADE20K segmentation (segment).
# Each runs `mpvg <command> --cell CELL --seed K --out runs/<stage>/CELL/seedK`; finetune,
# detect and segment start from the matching ImageNet run of the same seed (a DAG edge).
#
# checkpoint.pt is deliberately not a declared output: Snakemake deletes a job's outputs
# before it (re)runs it, which would throw away the state a preempted run resumes from.
# result.json (written last) marks a finished run.
#
# Inputs are ancient(): Snakemake 9 always compares modification times (its `mtime` rerun
# trigger cannot be switched off), and results restored by `dvc pull`/`dvc checkout` get fresh,
# arbitrary mtimes. A job reruns when its output is missing, its params (the resolved cell),
# its set of inputs or its software environment changed, or a job it depends on reruns.

for _stage in wf.CELL_STAGES:

    rule:
        name:
            _stage
        input:
            planned(_stage, lambda job: ancient(job.deps)),
        output:
            f"{RUNS}/{_stage}/{{cell}}/seed{{seed}}/{wf.RESULT}",
        params:
            cmd=command(_stage),
            run=lambda wildcards: wf.run_signature(P, wildcards.cell),
        threads: planned(_stage, lambda job: job.resources["threads"])
        resources:
            **{name: planned(_stage, lambda job, name=name: job.resources[name]) for name in RESOURCES},
        shell:
            "{params.cmd}"
