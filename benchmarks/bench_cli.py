"""Latency of the light `mpvg` commands, as a ratio to starting Python itself in the same run.

Each command runs ``--repeat`` times as a fresh process (``python -m mpvg ...``, the source
tree of ``--src`` first on the path, in the repository root); the median wall time is compared
with the median of ``python -c pass`` measured in between, so the ratio is about the command,
not about how busy the machine is. ``import torch`` is timed too, as the cost a light command
must not pay.

    .venv/bin/python benchmarks/bench_cli.py                    # this checkout
    .venv/bin/python benchmarks/bench_cli.py --src /tmp/old/src # another one (before/after)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["cells"], ["workflow", "cost"], ["workflow", "plan"], ["data", "check"], ["status"])
REFERENCES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}


def wall(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the package's source folder (default: ./src)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per command (median; default 5)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(args.src.resolve()), "OMP_NUM_THREADS": "1"}
    jobs = {**{name: a for name, a in REFERENCES.items()}, **{"mpvg " + " ".join(c): ["-m", "mpvg", *c] for c in COMMANDS}}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for name, a in jobs.items():  # once each first: the page cache, .pyc files
        wall(a, env)
    for _ in range(args.repeat):  # interleaved, so a busy spell hits every command alike
        for name, a in jobs.items():
            times[name].append(wall(a, env))
    base = statistics.median(times["python -c pass"])
    rows = {name: {"median_s": round(statistics.median(t), 4), "ratio_to_python": round(statistics.median(t) / base, 1)}
            for name, t in times.items()}
    width = max(map(len, rows))
    print(f"{'command':<{width}}  median s  x python -c pass   (src: {args.src}, {args.repeat} runs)")
    for name, r in rows.items():
        print(f"{name:<{width}}  {r['median_s']:8.3f}  {r['ratio_to_python']:8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"src": str(args.src), "repeat": args.repeat, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
