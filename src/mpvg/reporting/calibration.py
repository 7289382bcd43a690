"""The calibration table: official checkpoints evaluated through the project's own data path.

Each official checkpoint of a Default model (`mpvg eval --cell in1k-<model>-default --weights
FILE`) writes ``<paths.runs>/calibration/<cell>/result.json``; this table puts its top-1 beside
the top-1 its authors published.  It is the first check of the evaluation path (data, eval
transform, model code, top-1) that a user can run in an hour, long before any training.

The published numbers, and where they are printed (the checkpoints' own README tables; the
evaluation commands there are the original code bases', with the eval transforms that the
models' pretrained cfgs record):
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

from mpvg.reporting.tables import MISSING, PENDING
from mpvg.results.render import Table, scale_note
from mpvg.run.layout import RESULT


class Published(NamedTuple):
    top1: float
    checkpoint: str   # the released file name
    source: str       # where the number is printed


#: Paper model name -> the official ImageNet-1K checkpoint of its Default model.
PUBLISHED: dict[str, Published] = {
    "DeiT-Ti": Published(72.2, "deit_tiny_patch16_224-a1311bcf.pth",
                         "facebookresearch/deit README_deit.md (its eval command prints Acc@1 72.202)"),
    "DeiT-S": Published(79.9, "deit_small_patch16_224-cd65a155.pth",
                        "facebookresearch/deit README_deit.md (its eval command prints Acc@1 79.854)"),
    "DeiT-B": Published(81.8, "deit_base_patch16_224-b5f2ef4d.pth",
                        "facebookresearch/deit README_deit.md (its eval command prints Acc@1 81.846)"),
    "T2T-ViT-7": Published(71.7, "71.7_T2T_ViT_7.pth.tar", "yitu-opensource/T2T-ViT README.md, lite variants"),
    "CeiT-Ti": Published(76.4, "ceit_tiny_patch16_224 (Google Drive link in the README)",
                         "coeusguo/ceit README.md, model zoo"),
    "Swin-Ti": Published(81.2, "swin_tiny_patch4_window7_224.pth",
                         "microsoft/Swin-Transformer README.md (trained without the absolute PE: loaded with "
                         "absolute_pos_embed = 0, so this checks the evaluation path, not the paper's Default)"),
}

CALIBRATION_DIR = "calibration"  # <paths.runs>/calibration/<cell>/result.json (docs/contracts.md)


def result_path(runs_dir: Path | str, cell: str) -> Path:
    return Path(runs_dir) / CALIBRATION_DIR / cell / RESULT


def load_calibration(runs_dir: Path | str) -> dict[str, dict]:
    """``{cell: result}`` for every ``calibration/<cell>/result.json`` under ``runs_dir``."""
    out = {}
    for path in sorted((Path(runs_dir) / CALIBRATION_DIR).glob("*/result.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        missing = [k for k in ("cell", "metrics", "weights", "scale") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing}; expected the output of `mpvg eval --weights`")
        if data["cell"] != path.parent.name:
            raise ValueError(f"{path}: field cell={data['cell']!r} but the folder is {path.parent.name!r}")
        out[data["cell"]] = data
    return out


def _default_cell(cells: dict, model: str) -> Optional[str]:
    ids = sorted(cid for cid, c in cells.items()
                 if c.task == "in1k" and c.model == model and c.method == "Default" and not c.pe_overrides)
    return ids[0] if ids else None


def build_calibration_table(cells: dict, runs_dir: Path | str, params: dict) -> Optional[Table]:
    """The calibration table, or ``None`` while no ``mpvg eval --weights`` result exists."""
    results = load_calibration(runs_dir)
    if not results:
        return None
    scale = params.get("scale", "?")
    columns = ["Model", "Cell", "Checkpoint", "Published top-1", "Ours top-1", "Δ", "Val images"]
    table = Table("calibration", "Calibration: official checkpoints through our evaluation path", "", columns,
                  "lllrrrr")
    other_scale = []
    for model, pub in PUBLISHED.items():
        cid = _default_cell(cells, model)
        res = results.get(cid) if cid else None
        if res is not None and res["scale"] != scale:
            other_scale.append(f"{cid} (scale {res['scale']})")
            res = None
        if res is None:
            table.add_row([model, cid or "not configured", pub.checkpoint, f"{pub.top1:.1f}", PENDING, MISSING,
                           MISSING])
            continue
        top1 = float(res["metrics"]["top1"])
        name = Path(res["weights"]["path"]).name
        table.add_row([model, cid, f"{name} (sha256 {res['weights']['sha256'][:12]})", f"{pub.top1:.1f}",
                       f"{top1:.2f}", f"{top1 - pub.top1:+.2f}", str(res.get("num_samples", MISSING))])
        for key, why in sorted((res["weights"].get("filled") or {}).items()):
            table.notes.append(f"{model}: {key} set to {why}")
        for key, value in sorted((res["weights"].get("unstored") or {}).items()):
            table.notes.append(f"{model}: evaluated with {key} = {value:.6g} (not stored in the checkpoint)")
    table.caption = ("Top-1 (%) of each official checkpoint of a Default model, evaluated by `mpvg eval --weights` "
                     "on the cell's validation set with the project's data path and eval transform; Δ = ours − "
                     f"published. '{PENDING}': no result yet. " + scale_note(scale))
    table.notes += [f"{m}: published {p.top1:.1f} from {p.source}" for m, p in PUBLISHED.items()]
    table.notes += [f"left out, other scale: {c}" for c in other_scale]
    return table
