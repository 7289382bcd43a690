"""What the run folders hold, against what params.yaml asks for: the one rerun rule.

For every job of the plan (:func:`mpvg.workflow.plan.build_plan`) :func:`job_states` says whether
its output is *current* and, if not, why:

* a training / fine-tuning / detection / segmentation run is current when its ``result.json``
  exists and the signature inputs it records equal the ones the current params give
  (:mod:`mpvg.signature`; the run it starts from enters as that run's signature);
* ``analyze`` and ``report`` are current when their record (``figures/analysis.json``,
  ``reports/build.json``) holds the signatures of exactly the runs they would read now, all current;
* ``data_tiny`` is current when its folders exist (what is in them enters every run's signature
  through the dataset fingerprint).

A job must run when it is not current, or when a job it depends on must run (everything
downstream reruns), or when its checkpoint is gone and a job that reads it must run. File
modification times never matter. Snakemake (workflow/rules) and the report (``stale`` cells) and
``mpvg status`` all use this; DVC's own rule (hashes of deps, params and outs) agrees with it,
which tests/test_dag_moves.py checks move by move.

Torch-free and cheap: a JSON read per run; Snakemake calls it while it plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mpvg.config import resolve_run
from mpvg.run.layout import CHECKPOINT, KEPT
from mpvg.runinfo import read_json_object
from mpvg.signature import aggregate_inputs, cell_inputs, differences, digest

AGGREGATE_RECORD = {"analyze": "analysis.json", "report": "build.json"}
# the run layer's second link to result.json: a run whose result.json is gone gets it back from
# there when its settings are those of the kept result
KEPT_NAME = KEPT


@dataclass
class JobState:
    """One job's state: ``status`` is ``current``, ``missing``, ``stale`` or ``unfinished``
    (a checkpoint but no result: interrupted, resumes); ``reasons`` say why it is not current."""

    rule: str
    key: str
    status: str
    reasons: list[str] = field(default_factory=list)
    signature: str | None = None            # what it is (current) or will be (after its run)
    recorded: str | None = None             # what its record says now
    needs_run: bool = False
    checkpoint_missing: bool = False
    checkpoint_needed: bool = False         # current, but a job that reads its checkpoint.pt must run

    @property
    def name(self) -> str:
        return f"{self.rule}@{self.key}" if self.key else self.rule

    @property
    def current(self) -> bool:
        return self.status == "current"



def record_path(job) -> Path:
    """The file that records what a job's output was made from."""
    if job.cell:
        return Path(job.outs[0])
    if job.rule == "analyze":
        return Path(job.outs[0]) / AGGREGATE_RECORD["analyze"]
    if job.rule == "report":
        return Path(job.outs[0]).parent / AGGREGATE_RECORD["report"]
    return Path(job.outs[0])


def aggregate_settings(params: Mapping, rule: str) -> dict:
    if rule != "report":
        return {"scale": params["scale"]}
    settings = {"scale": params["scale"], "seeds": list(params["seeds"])}
    if params.get("seeds_per_cell"):  # only when set, so the report of a DAG without it keeps its signature
        settings["seeds_per_cell"] = {k: list(v) for k, v in params["seeds_per_cell"].items()}
    return settings


def parents_of(job, jobs_by_out: Mapping[str, object]) -> list:
    """The jobs whose outputs ``job`` reads."""
    return [jobs_by_out[d] for d in job.deps if d in jobs_by_out]


def job_states(params: Mapping, jobs: list) -> dict[tuple[str, str], JobState]:
    """The state of every job of ``jobs`` (in plan order, parents first), keyed ``(rule, key)``."""
    by_out = {out: job for job in jobs for out in job.outs}
    states: dict[tuple[str, str], JobState] = {}
    jobs = [job for job in jobs if not job.target]  # table1, ...: always run when asked for
    for job in jobs:
        parents = parents_of(job, by_out)
        if job.cell:
            st = _cell_state(params, job, [states[(p.rule, p.key)] for p in parents if p.cell])
        elif job.rule in AGGREGATE_RECORD:
            st = _aggregate_state(params, job, [states[(p.rule, p.key)] for p in parents if p.cell])
        else:
            missing = [out for out in job.outs if not Path(out).exists()]
            st = JobState(job.rule, job.key, "missing" if missing else "current",
                          [f"{m} is missing" for m in missing])
        states[(job.rule, job.key)] = st
    _close_over_dependents(jobs, states, by_out)
    return states


def _cell_state(params: Mapping, job, parent_states: list[JobState]) -> JobState:
    init = parent_states[0].signature if parent_states else None
    spec = resolve_run(params, job.cell)
    inputs = cell_inputs(spec, job.seed, init)
    sig = digest(inputs)
    out = Path(job.outs[0])
    ckpt_missing = not (out.parent / CHECKPOINT).exists()
    record = read_json_object(out) if out.exists() else None
    kept = out.parent / KEPT_NAME
    if not out.exists() and kept.exists():
        # deleted by Snakemake/DVC before a rerun (or by hand)
        was = read_json_object(kept)
        diffs = differences(was.get("signature_inputs"), inputs) if was is not None else []
        if diffs:
            return JobState(job.rule, job.key, "stale", [f"result.json set aside: {d}" for d in diffs], sig,
                            was.get("signature"), checkpoint_missing=ckpt_missing)
    if record is None:
        if (out.parent / CHECKPOINT).exists():
            return JobState(job.rule, job.key, "unfinished", ["no result.json yet (interrupted; it resumes)"], sig,
                            checkpoint_missing=ckpt_missing)
        why = "result.json is unreadable" if out.exists() else "no result yet"
        return JobState(job.rule, job.key, "missing", [why], sig, checkpoint_missing=ckpt_missing)
    recorded_inputs = record.get("signature_inputs")
    diffs = differences(recorded_inputs, inputs)
    if diffs:
        return JobState(job.rule, job.key, "stale", diffs, sig, record.get("signature"),
                        checkpoint_missing=ckpt_missing)
    # current: its own recorded signature is what runs downstream of it chain on (the fingerprint
    # may be unknown here, e.g. a login node without the data)
    return JobState(job.rule, job.key, "current", [], record.get("signature") or sig, record.get("signature"),
                    checkpoint_missing=ckpt_missing)


def expected_aggregate(params: Mapping, rule: str, parent_states: list[JobState]) -> dict:
    """The inputs ``analyze``/``report`` will record once every run it reads is current."""
    return aggregate_inputs(rule, aggregate_settings(params, rule), {p.key: p.signature for p in parent_states})


def seen_aggregate(params: Mapping, rule: str, parent_states: list[JobState]) -> dict:
    """The inputs ``analyze``/``report`` record now: each run's signature if current, else None."""
    return aggregate_inputs(rule, aggregate_settings(params, rule),
                            {p.key: p.recorded if p.current else None for p in parent_states})


def _aggregate_state(params: Mapping, job, parent_states: list[JobState]) -> JobState:
    expected = expected_aggregate(params, job.rule, parent_states)
    sig = digest(expected)
    missing = [out for out in job.outs if not Path(out).exists()]
    if missing:
        return JobState(job.rule, job.key, "missing", [f"{m} is missing" for m in missing], sig)
    record = read_json_object(record_path(job)) or {}
    diffs = differences(record.get("signature_inputs"), expected)
    if diffs:
        return JobState(job.rule, job.key, "stale", diffs, sig, record.get("signature"))
    return JobState(job.rule, job.key, "current", [], sig, record.get("signature"))


def _close_over_dependents(jobs: list, states: dict, by_out: Mapping[str, object]) -> None:
    """``needs_run``: not current, or a job it depends on must run, or its checkpoint is gone and a
    job that reads the checkpoint must run (repeated until nothing changes)."""
    children: dict[tuple, list] = {}
    for job in jobs:
        for parent in parents_of(job, by_out):
            children.setdefault((parent.rule, parent.key), []).append(job)
    readers = {(j.rule, j.key) for j in jobs if j.rule in ("analyze", "finetune", "detect", "segment")}
    for st in states.values():
        st.needs_run = not st.current
    changed = True
    while changed:
        changed = False
        for job in jobs:  # plan order: parents before children
            st = states[(job.rule, job.key)]
            if st.needs_run:
                continue
            # data_tiny regenerates the same data (the fingerprint says whether it changed): its
            # rerun alone reruns nothing downstream
            if any(states[(p.rule, p.key)].needs_run for p in parents_of(job, by_out)
                   if p.cell or p.rule in AGGREGATE_RECORD):
                st.needs_run, changed = True, True
                st.reasons.append("a job it depends on reruns")
            elif st.checkpoint_missing and job.cell and any(
                    states[(c.rule, c.key)].needs_run and (c.rule, c.key) in readers
                    for c in children.get((job.rule, job.key), [])):
                st.needs_run, st.checkpoint_needed, changed = True, True, True
                st.reasons.append("checkpoint.pt is gone and a job that reads it reruns")


def summary(states: Mapping[tuple, JobState], limit: int = 12) -> list[str]:
    """What must run, most telling first: each stale job with what differs, each interrupted one,
    then the missing ones and those that rerun because a job they depend on does, counted."""
    must = [st for st in states.values() if st.needs_run]
    stale = [st for st in must if st.status == "stale"]
    unfinished = [st for st in must if st.status == "unfinished"]
    missing = [st for st in must if st.status == "missing"]
    downstream = [st for st in must if st.status == "current"]
    lines = [f"{st.name}: stale ({'; '.join(st.reasons[:3])})" for st in stale[:limit]]
    if len(stale) > limit:
        lines.append(f"... and {len(stale) - limit} more stale")
    lines += [f"{st.name}: interrupted, resumes" for st in unfinished[:limit]]
    if missing:
        names = ", ".join(st.name for st in missing[:3])
        lines.append(f"{len(missing)} without a result yet ({names}{', ...' if len(missing) > 3 else ''})")
    if downstream:
        names = ", ".join(st.name for st in downstream[:3])
        lines.append(f"{len(downstream)} because a job they depend on runs ({names}{', ...' if len(downstream) > 3 else ''})")
    return lines


def plan_states(params: Mapping, runs: str | Path | None = None) -> tuple[list, dict]:
    """``(jobs, states)`` of the plan of ``params`` (with ``runs`` instead of ``paths.runs`` if given)."""
    from mpvg.workflow.plan import build_plan

    p = params if runs is None else {**params, "paths": {**params["paths"], "runs": str(runs)}}
    jobs = build_plan(p)
    return jobs, job_states(p, jobs)


def current_runs(params: Mapping, runs: str | Path | None = None) -> dict[tuple[str, int], str | None]:
    """``{(cell, seed): the signature its result.json records if the run is current, else None}``
    for every run of the plan: what the command line hands the readers
    (:func:`mpvg.results.runs.split_current`), which do not plan the DAG themselves."""
    jobs, states = plan_states(params, runs)
    out: dict[tuple[str, int], str | None] = {}
    for job in jobs:
        if job.cell:
            st = states[(job.rule, job.key)]
            out[(job.cell, job.seed)] = st.recorded if st.current else None
    return out


def seen_record(params: Mapping, rule: str, runs: str | Path | None = None) -> dict:
    """What ``analyze`` / ``report`` write into their record (``analysis.json`` / ``build.json``):
    the signatures of the runs they read now (``None`` for a run that is not current)."""
    jobs, states = plan_states(params, runs)
    by_out = {out: job for job in jobs for out in job.outs}
    job = next(j for j in jobs if j.rule == rule)
    parents = [states[(p.rule, p.key)] for p in parents_of(job, by_out) if p.cell]
    inputs = seen_aggregate(params, rule, parents)
    return {"signature": digest(inputs), "signature_inputs": inputs}


def run_settings(params: Mapping, jobs: list) -> dict[str, dict]:
    """``{settings file: settings}`` of every run of the plan: its signature inputs without the
    dataset's contents (DVC hashes the dataset itself) and with the start point's settings digest
    as ``init`` (:func:`settings_digests`). ``mpvg workflow signatures`` writes them; each DVC stage
    depends on its own file, so DVC reruns exactly the runs whose settings changed, as Snakemake does."""
    by_out = {out: job for job in jobs for out in job.outs}
    digests = settings_digests(params, [j for j in jobs if j.cell])
    out: dict[str, dict] = {}
    for job in jobs:
        if job.cell:
            parents = [p for p in parents_of(job, by_out) if p.cell]
            init = digests[(parents[0].rule, parents[0].key)] if parents else None
            out[job.settings] = cell_inputs(resolve_run(params, job.cell), job.seed, init, fingerprint=False)
    return out


# ------------------------------------------------------------------------------ Snakemake's view
# The rule above, said in Snakemake's own terms (docs/workflow.md, "The rerun rule in Snakemake's
# terms"): every job has its real inputs; a run's inputs from other runs are plain (a rerun
# upstream reruns it, also under -R/--forcerun), its dataset is ancient() (data_tiny regenerates
# the same data; the fingerprint in the signature is the witness of what is in it). Where
# Snakemake keeps no record, a job that must run gets one more input: a stale marker that a local
# job makes (an input that a job must first make: Snakemake runs the job, after deleting its old
# output itself). Nothing is moved while planning, so a dry run changes no file's contents; a
# current output is made no older than its inputs (what `snakemake --touch` does), because
# Snakemake compares modification times whatever its rerun triggers say.


def plain_inputs(job, by_out: Mapping[str, object]) -> list[str]:
    """The inputs of ``job`` whose change reruns it in Snakemake: the results of the runs it reads."""
    return [d for d in job.deps if d in by_out and getattr(by_out[d], "cell", None)]


def settings_digests(params: Mapping, jobs: list) -> dict[tuple[str, str], str]:
    """``{(rule, key): digest}``: what decides each job's output, from params alone (no dataset is
    read, so every host computes the same): a run's settings (with the settings digest of the run
    it starts from); ``analyze`` / ``report``: their settings and the digests of the runs they read.
    The Snakefile gives it to every job as ``params: sig=...`` (Snakemake's params rerun trigger,
    ``--list-changes params``)."""
    by_out = {out: job for job in jobs for out in job.outs}
    out: dict[tuple[str, str], str] = {}
    for job in jobs:
        if job.cell:
            parents = [p for p in parents_of(job, by_out) if p.cell]
            init = out[(parents[0].rule, parents[0].key)] if parents else None
            out[(job.rule, job.key)] = digest(cell_inputs(resolve_run(params, job.cell), job.seed, init,
                                                          fingerprint=False))
        elif job.rule in AGGREGATE_RECORD:
            runs = {p.key: out[(p.rule, p.key)] for p in parents_of(job, by_out) if p.cell}
            out[(job.rule, job.key)] = digest(aggregate_inputs(job.rule, aggregate_settings(params, job.rule), runs))
    return out


def stale_markers(jobs: list, states: Mapping[tuple, JobState], folder: str | Path) -> dict[str, tuple]:
    """``{marker path: (rule, key, why)}``: one marker per job that must run (:func:`job_states`)
    while all its outputs are there. The Snakefile makes the marker an input of that job and the
    output of the local rule ``stale`` (``temp()``), so Snakemake plans the job because an input is
    made by a job that must run, deletes the old output before the job runs (the run folder then sets
    the old state aside in ``previous/<time>/``), and deletes the marker once the job has run.
    A job whose output is missing needs none: Snakemake remakes it (every job that reads it must run
    too, and gets its own marker). Markers live in ``folder`` as ``<rule>@<key>.<n>``, ``n`` the first
    number no file has: a marker left by a Snakemake that was killed before the job ran is there but
    must not count as made (Snakemake would then see nothing to do)."""
    folder = Path(folder)
    out: dict[str, tuple] = {}
    for job in jobs:
        st = states.get((job.rule, job.key))
        if job.target or st is None or not st.needs_run or not all(Path(o).exists() for o in job.outs):
            continue
        n = 0
        while (folder / f"{st.name}.{n}").exists():
            n += 1
        why = f"{st.name}: {st.status if st.status != 'current' else 'must run'} ({'; '.join(st.reasons[:3])})"
        out[str(folder / f"{st.name}.{n}")] = (job.rule, job.key, why)
    return out


def _mtime(path: Path) -> float:
    """The modification time Snakemake compares for ``path`` (a folder output carries it in its
    ``.snakemake_timestamp`` once Snakemake has made it)."""
    stamp = path / ".snakemake_timestamp"
    return (stamp if path.is_dir() and stamp.exists() else path).stat().st_mtime


def stamp_current(jobs: list, states: Mapping[tuple, JobState]) -> int:
    """Make each current output no older than its plain inputs (parents first), as `snakemake
    --touch` would; returns how many outputs were stamped. File times never decide anything here:
    the rule has already said these outputs are current."""
    import os

    by_out = {out: job for job in jobs for out in job.outs}
    stamped = 0
    for job in jobs:
        if job.target or not job.outs or states[(job.rule, job.key)].needs_run:
            continue
        inputs = [Path(d) for d in plain_inputs(job, by_out) if Path(d).exists()]
        outs = [Path(o) for o in job.outs if Path(o).exists()]
        if not inputs or len(outs) != len(job.outs):
            continue
        newest = max(_mtime(p) for p in inputs)
        if min(_mtime(o) for o in outs) >= newest:
            continue
        for out in outs:
            stamp = out / ".snakemake_timestamp"
            for path in ([out, stamp] if out.is_dir() and stamp.exists() else [out]):
                os.utime(path, (newest, newest))
        stamped += 1
    return stamped
