"""Run signatures: what decides a run's result, as data and as a short digest.

A run (train, fine-tune, detect, segment) is identified by its *signature inputs*
(:func:`cell_inputs`): the resolved cell (model name and create_model kwargs, PE config), the
recipe after scaling, the dataset (name, root, num_classes and a cheap fingerprint of what is
on disk, :mod:`mpvg.data.fingerprint`), the seed, the scale and the signature of the run it
starts from. The *signature* is the first 16 hex digits of the SHA-256 of those inputs as
canonical JSON. Both are written into ``checkpoint.pt`` and ``result.json``.

The contract (docs/contracts.md, docs/workflow.md):

* a run resumes its checkpoint only when the stored inputs equal the current ones
  (:func:`differences` is empty); otherwise its old state is set aside and it starts fresh;
* a finished run (``result.json``) is *current* when its recorded inputs equal the current ones;
  the workflow reruns exactly the runs that are missing or not current, and everything downstream.

Left out on purpose, because they do not change what is computed: the number of data loader
workers, the number of processes (batch sizes are global), evaluation/logging intervals, the
tracking server. The code version is not part of it either (the report names the commits).
A dataset fingerprint of ``None`` (the root is absent, e.g. a dry run on a login node) means
"unknown" and is never counted as a difference.

Torch-free: Snakemake computes signatures while it plans.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

FORMAT = 1
#: Recipe keys that do not change a run's result (data order and augmentation are functions of
#: the seed only, whatever the number of workers).
NON_RESULT_RECIPE_KEYS = frozenset({"workers"})
FINGERPRINT_PATH = ("dataset", "fingerprint")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(inputs: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``inputs``."""
    return hashlib.sha256(canonical(inputs).encode()).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    """JSON types only (tuples -> lists, paths -> str), so stored and recomputed inputs compare equal."""
    return json.loads(canonical(obj))


def cell_inputs(spec, seed: int, init: str | None = None, fingerprint: bool = True) -> dict:
    """The signature inputs of ``spec`` (a :class:`mpvg.config.RunSpec`) for ``seed``.

    ``init``: the signature of the run it starts from (fine-tuning, detection, segmentation), or
    ``"file:<sha256>"`` for a foreign checkpoint, else ``None``."""
    from mpvg.data.fingerprint import fingerprint as dataset_fingerprint

    cell = spec.cell
    recipe = {k: v for k, v in spec.recipe.items() if k not in NON_RESULT_RECIPE_KEYS}
    return _plain({
        "format": FORMAT, "cell": cell.id, "stage": cell.stage, "task": cell.task,
        "model": cell.model, "method": cell.method, "recipe_name": cell.recipe,
        "model_name": spec.model_name, "model_kwargs": spec.model_kwargs, "recipe": recipe,
        "dataset": {"name": spec.dataset, "root": str(spec.dataset_root), "num_classes": spec.num_classes,
                    "classes": list(spec.classes) if getattr(spec, "classes", None) else None,
                    "fingerprint": dataset_fingerprint(spec.dataset, spec.dataset_root) if fingerprint else None},
        "seed": int(seed), "scale": spec.scale, "init": init,
    })


def aggregate_inputs(job: str, settings: Mapping[str, Any], parents: Mapping[str, str | None]) -> dict:
    """Signature inputs of a job that reads many runs (``analyze``, ``report``): its own settings
    and, per run it reads (``<cell>-seed<k>``), that run's signature (``None`` when missing)."""
    return _plain({"format": FORMAT, "job": job, "settings": settings, "runs": dict(sorted(parents.items()))})


def differences(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], limit: int = 6) -> list[str]:
    """The settings that differ between ``recorded`` and ``current`` inputs, as readable lines
    (``"recipe.lr: 0.001 -> 0.002"``); empty when they match. An unknown current fingerprint
    (``None``) matches any recorded one. At most ``limit`` lines (then ``"... and N more"``)."""
    if recorded is None:
        return ["no signature recorded (written by an older mpvg, or not by mpvg)"]
    out: list[str] = []

    def walk(a: Any, b: Any, path: tuple) -> None:
        if path == FINGERPRINT_PATH and b is None:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b), key=str):
                if key not in b:
                    out.append(f"{_dotted(path + (key,))}: {_short(a[key])} -> (absent)")
                elif key not in a:
                    out.append(f"{_dotted(path + (key,))}: (absent) -> {_short(b[key])}")
                else:
                    walk(a[key], b[key], path + (key,))
        elif a != b:
            out.append(f"{_dotted(path)}: {_short(a)} -> {_short(b)}")

    walk(_plain(recorded), _plain(current), ())
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "<all>"


def _short(value: Any, width: int = 60) -> str:
    text = canonical(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def file_signature(path: str | Path) -> str:
    """``file:<16 hex of SHA-256>`` of a file's bytes: the identity of a checkpoint that mpvg did not
    write (official weights), so a run started from it changes signature when the file does."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return "file:" + h.hexdigest()[:16]


def expected_inputs(params: Mapping[str, Any], cell_id: str, seed: int) -> dict:
    """The signature inputs cell ``cell_id`` has under ``params`` for ``seed`` (its start point's
    signature computed the same way, recursively). What a run that starts from it checks the
    start point against (:func:`mpvg.run.folder.load_start_point`)."""
    from mpvg.config import resolve_run

    spec = resolve_run(params, cell_id)
    init = digest(expected_inputs(params, spec.cell.init_from, seed)) if spec.cell.init_from else None
    return cell_inputs(spec, seed, init)
