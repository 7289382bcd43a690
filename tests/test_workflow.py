"""The workflow: one DAG from params.yaml, Snakemake and DVC in step, start-of-run checks,
rerun triggers, environment files, MLflow with parallel jobs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, mlflow_server, run, tool_env
from mpvg.config import expand_cells, load_params
from mpvg.workflow import plan as wf
from mpvg.workflow.dvcyaml import render

PARAMS = ROOT / "params.yaml"


# --------------------------------------------------------------------------- helpers

def snakemake(workdir: Path, *args: str, timeout: float = 120, env: dict | None = None):
    return run(["snakemake", *args], workdir, timeout=timeout, env=env)


def dry_run_jobs(output: str) -> list[dict]:
    """The jobs of a `snakemake -n` (printshellcmds) log: rule, input, output, resources, shell."""
    jobs, job = [], None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            job = {"rule": m.group(1), "input": [], "output": [], "resources": {}, "threads": 1, "shell": None}
            jobs.append(job)
        elif job is not None:
            s = line.strip()
            for key in ("input", "output"):
                if s.startswith(f"{key}: "):
                    job[key] = s[len(key) + 2:].split(", ")
            if s.startswith("resources: "):
                job["resources"] = dict(kv.split("=", 1) for kv in s[len("resources: "):].split(", "))
            if s.startswith("threads: "):
                job["threads"] = int(s.split()[1])
            if line.startswith("Shell command: "):
                job["shell"] = line[len("Shell command: "):]
    return [j for j in jobs if j["rule"] != "all"]


def write_params(workdir: Path, edit) -> None:
    data = yaml.safe_load((workdir / "params.yaml").read_text())
    edit(data)
    (workdir / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def submitted_jobs() -> list[str]:
    """Every job the test cluster's accounting knows (pending ones included): a command that must
    not submit anything leaves this list as it was."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-a", "-S", "2000-01-01", "-o", "JobIDRaw"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


# --------------------------------------------------------------------------- the plan

def test_plan_has_every_cell_once_per_seed_with_edges_and_resources():
    paper = load_params(PARAMS, ["scale=paper", "seeds=[0,1]"])
    cells = expand_cells(paper)
    jobs = wf.build_plan(paper)
    cell_jobs = [j for j in jobs if j.cell]
    assert sorted((j.cell, j.seed) for j in cell_jobs) == sorted((c, s) for c in cells for s in (0, 1))
    # a cell two tables share is trained once
    assert cells["in1k-deit_ti-mpvg"].tables == ["T1", "T5", "T6"]
    assert sum(j.cell == "in1k-deit_ti-mpvg" for j in cell_jobs) == 2
    by_key = {j.key: j for j in cell_jobs}
    # T2T-ViT-7 on CIFAR-100 is fine-tuned from the matching ImageNet run of the same seed
    ft = by_key["c100-t2t_vit_7-mpvg-seed1"]
    assert ft.rule == "finetune"
    assert "runs/train/in1k-t2t_vit_7-mpvg/seed1/result.json" in ft.deps
    assert ft.args[ft.args.index("--init-from") + 1] == "runs/train/in1k-t2t_vit_7-mpvg/seed1/checkpoint.pt"
    # downstream DeiT-Ti x 4 methods start from their ImageNet checkpoints
    for method in ("default", "lape", "pvg", "mpvg"):
        for task, rule in (("coco", "detect"), ("ade20k", "segment")):
            job = by_key[f"{task}-deit_ti-{method}-seed0"]
            assert job.rule == rule and job.args[:2] == [rule, "train"]
            assert job.args[job.args.index("--pretrained") + 1] == f"runs/train/in1k-deit_ti-{method}/seed0/checkpoint.pt"
    # paper sizing: 4 GPUs per ImageNet run, 8 for DeiT-B; `mpvg launch` when > 1 GPU
    assert by_key["in1k-deit_ti-pvg-seed0"].resources["gpu"] == 4
    assert by_key["in1k-deit_b-pvg-seed0"].resources["gpu"] == 8
    assert by_key["in1k-deit_b-pvg-seed0"].argv()[:5] == ["mpvg", "launch", "--nproc-per-node", "8", "train"]
    assert by_key["c100-vit_lite-pvg-seed0"].argv()[0] == "mpvg"
    assert all(j.resources["runtime"] >= wf.MIN_RUNTIME_MIN for j in cell_jobs)
    # tiny: CPU only, and the generated data is the first job
    tiny_jobs = wf.build_plan(load_params(PARAMS))
    assert tiny_jobs[0].rule == "data_tiny"
    assert {j.resources["gpu"] for j in tiny_jobs} == {0}


def test_upstream_and_downstream_walk_the_plan_edges():
    """The two graph walks the Snakefile uses (stale markers of a target; runs a force verb
    retrains), on the tiny plan: exact job sets."""
    jobs = wf.build_plan(load_params(PARAMS))
    by_stage = {j.stage_name: j for j in jobs}
    t2t = by_stage["train@in1k-t2t_vit_7-mpvg-seed0"]
    # before CIFAR-100 T2T-ViT-7 MPVG: its ImageNet run and the generated data, each once
    up = wf.upstream(jobs, by_stage["finetune@c100-t2t_vit_7-mpvg-seed0"].outs)
    assert [j.stage_name for j in up] == ["finetune@c100-t2t_vit_7-mpvg-seed0", t2t.stage_name, "data_tiny"]
    assert wf.upstream(jobs, ["no/such/file"]) == []
    # after the ImageNet run: its fine-tune, the figures, the report and the targets that read the
    # two runs (Table 1 has T2T-ViT-7 on ImageNet, Table 2 on CIFAR-100)
    down = {j.stage_name for j in wf.downstream(jobs, [t2t])}
    assert down == {t2t.stage_name, "finetune@c100-t2t_vit_7-mpvg-seed0", "analyze", "report", "table1", "table2"}
    # everything downstream of the data is the whole plan
    assert len(wf.downstream(jobs, [by_stage["data_tiny"]])) == len(jobs)
    # the whole plan upstream of the report and figures: every job but the targets
    assert {j.stage_name for j in wf.upstream(jobs, wf.targets(load_params(PARAMS)))} == \
        {j.stage_name for j in jobs if not j.target}


def test_cost_table_sums_the_recipes():
    from mpvg.workflow.cost import cost_rows, cost_table

    paper = load_params(PARAMS, ["scale=paper"])
    rows = {r["cell"]: r for r in cost_rows(paper)}
    # DeiT: 300 epochs x 1,281,167 images at the planned throughput
    assert rows["in1k-deit_ti-mpvg"]["gpu_hours"] == pytest.approx(
        300 * 1_281_167 / wf.IMAGES_PER_S_PER_GPU["DeiT-Ti"] / 3600)
    # ADE20K: 160k iterations x batch 8
    assert rows["ade20k-deit_ti-mpvg"]["images_m"] == pytest.approx(160_000 * 8 / 1e6)
    table = cost_table(paper)
    assert table.count("\n") == len(rows) + 2 and "**total**" in table
    # the README shows the per-model table exactly as `mpvg workflow cost --by-model` prints it
    assert cost_table(paper, by_model=True) in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- Snakemake

@pytest.mark.slurm
def test_slurm_profile_dry_run_plans_paper_scale_fast(slurm_cluster, workdir):
    """`snakemake -n --profile slurm` at the root: paper scale, every cell with its resources,
    datasets absent, within 5 s of a local tiny-scale plan timed in the same test. On a cluster (here the test cluster): the SLURM plugin
    asks `scontrol show config` at start, which waits ~10 s when SLURM is installed but down."""
    assert not (workdir / "data").exists()
    start = time.monotonic()
    base = snakemake(workdir, "-n")  # the baseline, now, on this machine: the tiny plan, local executor
    baseline = time.monotonic() - start
    assert base.returncode == 0, base.stdout[-3000:]
    start = time.monotonic()
    res = snakemake(workdir, "-n", "--profile", "slurm")
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stdout[-3000:]
    # the plugin's start-up probes answer at once (a SLURM that does not answer costs ~9 s more)
    assert elapsed < baseline + 5.0, f"dry run took {elapsed:.1f} s, the local tiny plan {baseline:.1f} s"
    jobs = dry_run_jobs(res.stdout)
    paper = load_params(PARAMS, ["scale=paper"])
    cells = expand_cells(paper)
    assert len([j for j in jobs if j["rule"] in wf.CELL_STAGES]) == len(cells) * len(paper["seeds"])
    assert "data_tiny" not in {j["rule"] for j in jobs}
    for job in jobs:
        if job["rule"] in wf.CELL_STAGES:
            assert "--set scale=paper" in job["shell"]
            assert int(job["resources"]["gpu"]) >= 1 and int(job["resources"]["runtime"]) >= 30
            assert int(job["resources"]["mem_mb"]) >= 48000 and int(job["resources"]["cpus_per_task"]) >= 8
    deit_b = next(j for j in jobs if "--cell in1k-deit_b-mpvg " in j["shell"])
    assert deit_b["resources"]["gpu"] == "8" and deit_b["shell"].startswith("exec mpvg launch --nproc-per-node 8 train ")


@pytest.mark.slurm
def test_slurm_dry_run_on_four_gpu_nodes_plans_deit_b_over_two_nodes(slurm_cluster, workdir):
    """The node shape (node_gpus/cpus/mem_mb of the profile's configfile) set to 4-GPU nodes of 64
    CPUs: DeiT-B's 8 GPUs become 2 nodes x 4 GPUs, one srun task per GPU with CPUS_PER_GPU CPUs each (52
    of a node's 64), memory per node; 4-GPU jobs stay on one node under `mpvg launch`."""
    res = snakemake(workdir, "-n", "--profile", "slurm", "--config", "node_gpus=4", "node_cpus=64",
                    "node_mem_mb=500000")
    assert res.returncode == 0, res.stdout[-3000:]
    jobs = [j for j in dry_run_jobs(res.stdout) if j["rule"] in wf.CELL_STAGES]
    deit_b = [j for j in jobs if "--cell in1k-deit_b-" in j["shell"]]
    assert len(deit_b) == 4 * len(load_params(PARAMS, ["scale=paper"])["seeds"])  # 4 methods
    for job in deit_b:
        res_ = job["resources"]
        assert (res_["gpu"], res_["nodes"], res_["tasks_per_node"], res_["gres"], res_["mpi"], res_["cpus_per_task"],
                res_["mem_mb"]) == ("8", "2", "4", "gpu:4", "srun", str(wf.CPUS_PER_GPU), "192000"), res_
        assert job["shell"].startswith("exec srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 "
                                       f"--cpus-per-task={wf.CPUS_PER_GPU} --wait=60 mpvg train "), job["shell"]
    deit_ti = next(j for j in jobs if "--cell in1k-deit_ti-mpvg " in j["shell"])
    assert (deit_ti["resources"]["nodes"], deit_ti["resources"]["cpus_per_task"]) == ("1", str(4 * wf.CPUS_PER_GPU))
    assert "mpi" not in deit_ti["resources"] and deit_ti["shell"].startswith("exec mpvg launch --nproc-per-node 4 train ")
    # a shape a job cannot be spread over evenly is an error naming the job, before anything runs
    bad = snakemake(workdir, "-n", "--profile", "slurm", "--config", "node_gpus=3", "node_cpus=64", "node_mem_mb=500000")
    assert bad.returncode != 0
    assert "cannot place the jobs: train@in1k-deit_b-default: 8 GPUs cannot be spread evenly over 3 nodes of 3 GPUs" \
        in bad.stdout, bad.stdout[-2000:]


def test_plan_places_jobs_on_nodes():
    """`mpvg workflow plan --node` shows each job as nodes x GPUs; the placement rules."""
    paper = load_params(PARAMS, ["scale=paper"])
    jobs = {j.key: j for j in wf.build_plan(paper, node=wf.NodeShape(4, 64, 500_000)) if j.cell}
    assert wf.geometry(jobs["in1k-deit_b-mpvg-seed0"].resources) == "2 nodes x 4 GPUs"
    assert wf.geometry(jobs["in1k-deit_ti-mpvg-seed0"].resources) == "1 node x 4 GPUs"
    assert wf.geometry(jobs["c100-vit_lite-mpvg-seed0"].resources) == "1 node x 1 GPU"
    assert jobs["c100-vit_lite-mpvg-seed0"].argv()[:4] == ["mpvg", "launch", "--nproc-per-node", "1"]
    # CPUs and memory asked per node fit the node: 8 GPUs on 8-GPU nodes of 64 CPUs -> 8 per GPU
    small = wf.placement(8, wf.CPUS_PER_GPU, wf.MEM_MB_PER_GPU, wf.NodeShape(8, 64, 256_000))
    assert (small["nodes"], small["cpus_per_task"], small["mem_mb"]) == (1, 64, 256_000)
    with pytest.raises(ValueError, match=r"^x: 2 GPU processes per node need at least 2 CPUs; node_cpus is 1$"):
        wf.placement(2, 12, 1000, wf.NodeShape(2, 1, 4000), what="x")
    with pytest.raises(ValueError, match=r"one process per node, which the SLURM plugin's MPI mode refuses"):
        wf.placement(2, 12, 1000, wf.NodeShape(1, 16, 4000), what="x")
    res = run(["mpvg", "workflow", "plan", "--set", "scale=paper", "--node", "4,64,500000"], ROOT)
    assert res.returncode == 0, res.stdout[-2000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith("train@in1k-deit_b-mpvg-seed0\t"))
    assert line.split("\t")[1] == "2 nodes x 4 GPUs" and "\tsrun --nodes=2 --ntasks-per-node=4 " in line
    bad = run(["mpvg", "workflow", "plan", "--node", "4,64"], ROOT)
    assert bad.returncode == 2 and "--node '4,64': expected GPUS,CPUS,MEM_MB" in bad.stdout


def job_command(shell: str) -> str:
    """The `mpvg ...` command of a Snakemake job's shell line (without `exec` and the log redirect)."""
    return re.sub(r" >> \S+ 2>&1$", "", shell.removeprefix("exec "))


def _snakemake_view(workdir: Path, *args: str) -> dict:
    res = snakemake(workdir, "-n", *args)
    assert res.returncode == 0, res.stdout[-3000:]
    return {tuple(sorted(j["output"])): (job_command(j["shell"]), sorted(j["input"]))
            for j in dry_run_jobs(res.stdout)}


def _dvc_view(workdir: Path) -> dict:
    from dvc.repo import Repo

    view = {}
    with Repo(str(workdir)) as repo:
        for stage in repo.index.stages:
            # the targets (table1, ...) have no outs; the settings stage is DVC's own (see docs/workflow.md)
            # scores.json: an uncached DVC out of each run only (DVC's metrics are the report's, per table)
            outs = tuple(sorted(str(o.def_path) for o in stage.outs if not o.persist and not o.metric
                                and not o.plot and not str(o.def_path).endswith("/scores.json")))
            if not outs or stage.name == "signatures":
                continue
            deps = sorted(str(d.def_path) for d in stage.deps if type(d).__name__ != "ParamsDependency"
                          and "/.signatures/" not in str(d.def_path))
            view[outs] = (stage.cmd, deps)
    return view


@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_snakemake_and_dvc_describe_the_same_dag(workdir, scale):
    """Same stages, commands and outs; same deps except the external datasets (DVC deps only)."""
    overrides = [] if scale == "tiny" else ["--set", "scale=paper"]
    res = run(["mpvg", "workflow", "dvc-yaml", *overrides], workdir)
    assert res.returncode == 0, res.stdout
    smk = _snakemake_view(workdir, *([] if scale == "tiny" else ["--config", "scale=paper"]))
    dvc = _dvc_view(workdir)
    assert set(smk) == set(dvc)
    external = set(wf.external_datasets(load_params(PARAMS, [f"scale={scale}"])).values())
    for outs, (cmd, inputs) in smk.items():
        dvc_cmd, dvc_deps = dvc[outs]
        assert cmd == dvc_cmd, outs
        assert inputs == sorted(d for d in dvc_deps if d not in external and d != "params.yaml"), outs
    # persistent checkpoints are DVC outs next to every result
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        persist = {str(o.def_path) for s in repo.index.stages for o in s.outs if o.persist}
    assert persist == {o[0].replace("result.json", "checkpoint.pt") for o in smk if o[0].endswith("result.json")}


def test_committed_dvc_yaml_matches_params():
    """dvc.yaml is what `mpvg workflow dvc-yaml` makes of params.yaml (regenerate after editing it)."""
    assert (ROOT / "dvc.yaml").read_text() == render(wf.build_plan(load_params(PARAMS)), PARAMS)


def test_dvc_yaml_check_detects_a_stale_file(workdir):
    assert run(["mpvg", "workflow", "dvc-yaml", "--check"], workdir).returncode == 0
    write_params(workdir, lambda p: p.__setitem__("seeds", [0, 1]))
    res = run(["mpvg", "workflow", "dvc-yaml", "--check"], workdir)
    assert res.returncode == 1 and "stale" in res.stdout


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["grid"][0]["models"].append("DeiT-XL"), "unknown model 'DeiT-XL'"),
    (lambda p: p["grid"][1].setdefault("methods", ["MPVG"]).append("MPVG2"), "unknown method 'MPVG2'"),
])
@pytest.mark.slurm
def test_bad_params_stop_before_any_job(slurm_cluster, workdir, edit, needle):
    write_params(workdir, edit)
    before = submitted_jobs()
    for args in (["-n"], ["--profile", "slurm", "--default-resources", "slurm_partition=debug"]):
        res = snakemake(workdir, *args)
        assert res.returncode != 0
        assert needle in res.stdout, res.stdout[-2000:]
    assert submitted_jobs() == before
    assert not (workdir / "runs").exists()


def test_unknown_config_key_is_named(workdir):
    res = snakemake(workdir, "-n", "--config", "sclae=paper")
    assert res.returncode != 0 and "sclae" in res.stdout


@pytest.mark.slurm
def test_missing_dataset_stops_before_submitting(slurm_cluster, workdir):
    """A real paper-scale run without data: nothing reaches the cluster; the message names the path."""
    before = submitted_jobs()
    res = snakemake(workdir, "--profile", "slurm", "--default-resources", "slurm_partition=debug")
    assert res.returncode != 0
    assert "data/imagenet does not exist" in res.stdout, res.stdout[-3000:]
    assert submitted_jobs() == before
    assert not (workdir / "runs").exists()
    # the same check as a command
    check = run(["mpvg", "workflow", "check", "--set", "scale=paper"], workdir)
    assert check.returncode == 1 and "data/imagenet" in check.stdout


@pytest.mark.slurm
def test_slurm_profile_without_partition_stops_before_submitting(slurm_cluster, workdir):
    before = submitted_jobs()
    res = snakemake(workdir, "--profile", "slurm", "--config", "scale=tiny", "cluster=test")
    assert res.returncode != 0
    assert "no SLURM partition" in res.stdout and "slurm_partition" in res.stdout, res.stdout[-3000:]
    assert submitted_jobs() == before
    assert not (workdir / "runs").exists() and not (workdir / "data").exists()


@pytest.mark.slurm
def test_the_slurm_profile_keeps_its_scale_under_any_config(slurm_cluster, workdir):
    """`--config set=[...]` merges into the profile's configfile: three seeds of GPU jobs."""
    res = snakemake(workdir, "-n", "--profile", "slurm", "--config", 'set=["seeds=[0,1,2]"]')
    assert res.returncode == 0, res.stdout[-3000:]
    cells = [j for j in dry_run_jobs(res.stdout) if j["rule"] in wf.CELL_STAGES]
    paper = load_params(PARAMS, ["scale=paper"])
    assert len(cells) == 3 * len(expand_cells(paper))
    assert all(int(j["resources"]["gpu"]) >= 1 and "--set scale=paper" in j["shell"] for j in cells)
    assert {re.search(r"--seed (\d+)", j["shell"]).group(1) for j in cells} == {"0", "1", "2"}


@pytest.mark.slurm
def test_a_tiny_plan_never_goes_to_slurm(slurm_cluster, workdir):
    before = submitted_jobs()
    for args in (["-n"], []):
        res = snakemake(workdir, *args, "--profile", "slurm", "--config", "scale=tiny")
        assert res.returncode != 0
        assert "the slurm profile would submit tiny-scale jobs" in res.stdout, res.stdout[-2000:]
    assert submitted_jobs() == before


@pytest.mark.slurm
def test_a_table_target_on_slurm_plans_that_table_and_its_parents_only(slurm_cluster, workdir):
    res = snakemake(workdir, "-n", "--profile", "slurm", "table2")
    assert res.returncode == 0, res.stdout[-3000:]
    jobs = dry_run_jobs(res.stdout)
    cells = sorted(re.search(r"--cell (\S+)", j["shell"]).group(1) for j in jobs if j["rule"] in wf.CELL_STAGES)
    assert cells == sorted([f"c100-vit_lite-{m}" for m in ("default", "lape", "pvg", "mpvg")]
                           + [f"c100-t2t_vit_7-{m}" for m in ("default", "lape", "pvg", "mpvg")]
                           + [f"in1k-t2t_vit_7-{m}" for m in ("default", "lape", "pvg", "mpvg")])
    assert {j["rule"] for j in jobs} == {"train", "finetune", "table2"}
    assert all(int(j["resources"]["gpu"]) >= 1 for j in jobs if j["rule"] in wf.CELL_STAGES)


# The warnings `snakemake --lint` keeps giving, each justified in docs/workflow.md ("Lint").
JUSTIFIED_LINTS = {
    "Specify a conda environment or container for each rule",
    "Mixed rules and functions in same snakefile",
    "Environment variable PATH used but not asserted with envvars directive in line N",
    "Environment variable MPVG_STOP_WITH_PARENT used but not asserted with envvars directive in line N",
    'Absolute path "/proc" in line N',
}


def test_snakemake_lint_is_clean_but_for_the_justified_warnings(workdir):
    res = snakemake(workdir, "--lint")
    titles = {re.sub(r"line \d+", "line N", line.strip()[2:]).rstrip(":").rstrip(".")
              for line in res.stdout.splitlines() if line.startswith("    * ")}
    assert titles, res.stdout[-2000:]
    assert titles <= JUSTIFIED_LINTS, titles - JUSTIFIED_LINTS


# --------------------------------------------------------------------------- files

def test_slurm_profile_is_found_at_the_root():
    link = ROOT / "slurm"
    assert link.is_symlink() and (link / "config.v8+.yaml").is_file()
    profile = yaml.safe_load((link / "config.v8+.yaml").read_text())
    assert profile["executor"] == "slurm" and "config" not in profile  # a --config would replace it
    config = yaml.safe_load((ROOT / profile["configfile"]).read_text())
    assert config["scale"] == "paper" and config["cluster"] == "slurm" and config["dvc_commit"] is False
    assert profile["slurm-requeue"] is True and profile["retries"] >= 1
    assert "slurm_partition" not in profile["default-resources"]  # the user sets it (one place)
    default = yaml.safe_load((ROOT / "profiles/default/config.v8+.yaml").read_text())
    # the rerun rule in Snakemake's terms: params sig, no input/mtime triggers, the workflow's own lock
    assert default["rerun-triggers"] == ["params", "software-env"] and default["nolock"] is True


def test_conda_env_pins_match_the_lock():
    lock = {}
    for line in (ROOT / "envs/requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            lock[name.lower()] = version.strip()
    env = yaml.safe_load((ROOT / "envs/mpvg.yaml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == f"python={sys.version_info.major}.{sys.version_info.minor}"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-c requirements.lock" in pip
    pins = dict(p.split("==", 1) for p in pip if "==" in p)
    assert pins and all(lock[name.lower()] == version for name, version in pins.items())
    top = [re.split(r"[=<>!~\[ ]", line.split("#")[0].strip())[0].lower()
           for line in (ROOT / "envs/requirements.in").read_text().splitlines() if line.split("#")[0].strip()]
    assert sorted(top) == sorted(name.lower() for name in pins)


def test_ci_runs_make_test():
    ci = ROOT / ".ci/run"
    assert os.access(ci, os.X_OK)
    assert re.search(r"^exec make test$", ci.read_text(), re.M)
    # ... and `make test` runs the whole suite: slow tests included (pyproject's addopts deselect them)
    recipe = re.search(r"^test: .*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert re.search(r'^\tpytest -m "slow or not slow"', recipe, re.M), recipe


# --------------------------------------------------------------------------- MLflow

LOG_ONE_RUN = """
import sys
from mpvg.tracking import RunTracker
uri, out, name = sys.argv[1:4]
t = RunTracker(out, uri, "parallel")
assert t.start(name, {"cell": name}, {"recipe": {"lr": 0.1}}) is not None, "no run"
for step in range(3):
    t.log_metrics({"loss": 1.0 / (step + 1)}, step)
t.finish()
assert t.online, "tracking went offline"
"""


def _log_in_parallel(uri: str, tmp_path: Path, n: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", LOG_ONE_RUN, uri, str(tmp_path / f"job{i}"), f"job{i}"],
                              env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-2000:]


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("parallel")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_parallel_jobs_lose_no_run_in_the_local_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    res = run(["mpvg", "tracking", "--params", str(PARAMS), "init"], tmp_path, env=tool_env(MLFLOW_TRACKING_URI=uri))
    assert res.returncode == 0, res.stdout[-2000:]
    _log_in_parallel(uri, tmp_path, 4)
    runs = _runs(uri)
    assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]
    assert all(r.info.status == "FINISHED" and len(r.data.metrics) == 1 for r in runs)


@pytest.mark.slow  # ~40 s; the local-store variant above stays in the default suite
def test_parallel_jobs_log_through_a_real_mlflow_server(tmp_path):
    with mlflow_server(tmp_path) as (uri, _):
        _log_in_parallel(uri, tmp_path, 4)
        runs = _runs(uri)
        assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]
        assert all(r.data.metrics["loss"] == pytest.approx(1 / 3) for r in runs)


# --------------------------------------------------------------------------- real runs

def _shorten_tiny(workdir: Path, epochs: int = 1) -> None:
    """Fewer epochs for the classification recipes (a params change, not a DAG change)."""
    def edit(p):
        for name, recipe in p["tiny"]["recipes"].items():
            if "epochs" in recipe and "lr_steps" not in recipe:
                recipe["epochs"] = epochs
    write_params(workdir, edit)


@pytest.mark.slow  # ~35 s of real training through dvc repro
def test_dvc_repro_of_one_training_stage_from_a_clean_copy(workdir):
    """`dvc repro train@<cell>-seed0` runs the tiny data and that cell alone; `dvc status` is clean."""
    _shorten_tiny(workdir)
    subprocess.run(["git", "add", "-A"], cwd=workdir, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clean"], cwd=workdir, check=True)
    stage = "train@c100-vit_lite-mpvg-seed0"
    res = run(["dvc", "repro", stage], workdir, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert (workdir / "runs/train/c100-vit_lite-mpvg/seed0/result.json").is_file()
    assert not (workdir / "runs/train/c100-vit_lite-default").exists()  # nothing else ran
    status = run(["dvc", "status", stage], workdir)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"signatures", "data_tiny", stage}


WHOLE_DAG_EPOCHS = {"deit": 1, "swin": 1, "ceit": 1, "t2t": 1, "vit_lite_c100": 1, "t2t_c100": 1}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_whole_tiny_dag_on_two_cores(workdir):
    """The demo's DAG: every cell, figures and tables at the tiny scale; an MLflow run per cell.
    Every job of the demo runs, each classification cell for one epoch instead of 5 (3 for T2T's
    CIFAR fine-tuning) to fit CI; `make demo` runs the same DAG with the default epochs."""
    write_params(workdir, lambda p: [p["tiny"]["recipes"][name].__setitem__("epochs", epochs)
                                     for name, epochs in WHOLE_DAG_EPOCHS.items()])
    start = time.monotonic()
    res = snakemake(workdir, "--cores", "2", timeout=3600)
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stdout[-4000:]
    params = load_params(workdir / "params.yaml")
    jobs = wf.build_plan(params)
    done = re.findall(r"^(\d+) of (\d+) steps \(100%\) done", res.stdout, re.M)
    steps = sum(1 for job in jobs if not job.target) + 1  # every job of the DAG and `all` (per-table targets aside)
    assert done == [(str(steps),) * 2], res.stdout[-3000:]
    for job in jobs:
        for out in job.outs:
            assert (workdir / out).exists(), out
    results = [json.loads((workdir / j.outs[0]).read_text()) for j in jobs if j.cell]
    assert all(r["scale"] == "tiny" for r in results)
    uri = f"sqlite:///{workdir / 'mlruns.db'}"
    from mlflow import MlflowClient

    from mpvg.tracking import experiment_ids

    client = MlflowClient(tracking_uri=uri)  # training runs in <experiment>/<task>, analysis and report in <experiment>
    runs = client.search_runs(list(experiment_ids(uri, params["tracking"]["experiment"]).values()), max_results=5000)
    assert {r["mlflow_run_id"] for r in results} <= {r.info.run_id for r in runs}
    print(f"whole tiny DAG: {len(jobs)} jobs in {elapsed:.0f} s")
