# One rule per kind of job of a cell: ImageNet/CIFAR training from scratch (train), fine-tuning
# from an ImageNet checkpoint (finetune), COCO detection (detect), ADE20K segmentation (segment).
# Each runs `mpvg <command> --cell CELL --seed K --out runs/<stage>/CELL/seedK`; finetune,
# detect and segment start from the matching ImageNet run of the same seed (a DAG edge).
#
# checkpoint.pt is deliberately not a declared output: Snakemake deletes a job's outputs
# before it (re)runs it, which would throw away the state a preempted run resumes from.
# result.json (written last) marks a finished run. Which jobs run is the rerun rule of
# common.smk (mpvg.workflow.state): the real inputs, and `sig` for Snakemake's params trigger.
# `exec` makes the job's process a direct child of Snakemake (it stops when Snakemake dies).

for _stage in wf.CELL_STAGES:

    rule:
        name:
            _stage
        input:
            planned(_stage, job_inputs),
        output:
            f"{RUNS}/{_stage}/{{cell}}/seed{{seed}}/{wf.RESULT}",
        log:
            f"{RUNS}/{_stage}/{{cell}}/seed{{seed}}/{wf.JOB_LOG}",
        params:
            cmd=command(_stage),
            sig=job_sig(_stage),
        threads: planned(_stage, lambda job: job.resources["threads"])
        resources:
            **{name: planned(_stage, lambda job, name=name: job.resources.get(name)) for name in RESOURCES},
        shell:
            "exec {params.cmd} >> {log} 2>&1"
