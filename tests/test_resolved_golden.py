"""The resolved settings of every cell, every run's signature inputs and every planned job's
command line, at every scale, equal the committed golden file (tests/golden/resolved_settings.json).

A change of params.yaml's layout (recipe inheritance, defaults, the tiny override) or of the
resolution in mpvg.config must leave every run's settings as they were: a finished run whose
signature changes would be trained again for nothing (docs/config.md). A change meant to alter
results regenerates the file on purpose, and the diff shows what moved:

    PYTHONPATH=src python tests/test_resolved_golden.py     # rewrites the golden file

Signatures are computed without the dataset fingerprint (``fingerprint=False``, as
``mpvg workflow signatures`` writes each run's settings file): the fingerprint depends on the
files on disk, not on params, and every other signature input is recorded here, so a run's full
signature is unchanged whenever these inputs are (mpvg.signature.digest over the same JSON).
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "resolved_settings.json"
SCALES = ("tiny", "budget", "paper")


def resolved_settings(params_file: Path = ROOT / "params.yaml") -> dict:
    from mpvg.config import expand_cells, load_params, resolve_run
    from mpvg.signature import digest
    from mpvg.workflow.plan import build_plan
    from mpvg.workflow.state import run_settings

    out: dict = {}
    for scale in SCALES:
        params = load_params(params_file, [f"scale={scale}"])
        cells = {}
        for cid in expand_cells(params):
            spec = resolve_run(params, cid)
            cells[cid] = {"model_name": spec.model_name, "model_kwargs": spec.model_kwargs,
                          "recipe": spec.recipe, "dataset": spec.dataset, "dataset_root": str(spec.dataset_root),
                          "num_classes": spec.num_classes, "classes": list(spec.classes) if spec.classes else None,
                          "seeds": spec.seeds, "runs_root": str(spec.runs_root), "tracking": spec.tracking,
                          "cell": {k: v for k, v in spec.cell.__dict__.items()}}
        # the plan with the params file named as the Snakefile and dvc.yaml name it
        jobs = build_plan(params, "params.yaml")
        settings = run_settings(params, jobs)
        out[scale] = {
            "cells": cells,
            "jobs": [{"stage": j.stage_name, "cmd": j.shell(), "deps": j.deps, "outs": j.outs,
                      "resources": j.resources} for j in jobs],
            "signatures": {path: {"signature": digest(inputs), "inputs": inputs}
                           for path, inputs in settings.items()},
        }
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def test_resolved_settings_signatures_and_commands_match_the_golden_file():
    golden = json.loads(GOLDEN.read_text())
    now = resolved_settings()
    for scale in SCALES:
        assert sorted(now[scale]["cells"]) == sorted(golden[scale]["cells"]), scale
        for cid, want in golden[scale]["cells"].items():
            assert now[scale]["cells"][cid] == want, f"{scale} {cid}"
        assert now[scale]["jobs"] == golden[scale]["jobs"], scale
        assert now[scale]["signatures"] == golden[scale]["signatures"], scale
    assert now == golden


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(resolved_settings(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
