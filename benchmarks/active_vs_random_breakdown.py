"""Held-out force RMSE of active-vs-random runs split by test composition and kind (the CuNi diagnosis).

    python benchmarks/active_vs_random_breakdown.py runs_b4/cuni/committee/seed2:47 runs_b4/cuni/random/seed0:60

Each argument is ``<run directory>:<labels>``: the committee of the first iteration trained on that
many labels is evaluated on the benchmark's held-out CuNi test set (the same frames as
``active_vs_random.py``), per Ni fraction (x = 0.25 / 0.5 / 0.75 bins) and per kind (md, strained,
vacancy). One JSON line per run on stdout. Units: eV/Å.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import active_vs_random as avr  # noqa: E402


def groups_of(test: list[Any]) -> dict[str, list[Any]]:
    """Test frames by Ni-fraction bin and by kind."""
    out: dict[str, list[Any]] = {}
    for a in test:
        x = float((a.numbers == 28).mean())  # a vacancy cell sits near, not at, its composition
        out.setdefault(f"x{min(avr.TEST_COMPOSITIONS, key=lambda c: abs(c - x))}", []).append(a)
        out.setdefault(a.info["test_kind"], []).append(a)
    return out


def committee_at(run_dir: Path, labels: int) -> Path:
    """The committee checkpoint of the first iteration trained on ``labels`` frames."""
    from alflow.errors import InputError
    from alflow.loop import read_state

    stages = read_state(run_dir)["stages"]
    for key in sorted(k for k in stages if k.endswith("/train")):
        result = stages[key]["result"]
        if int(result["n_frames"]) == labels:
            return run_dir / result["committee"]
    raise InputError(f"{run_dir}: no iteration trained on {labels} labels")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="<run directory>:<labels>")
    p.add_argument("--test-md", type=int, default=120)
    p.add_argument("--test-defects", type=int, default=36)
    args = p.parse_args(argv)

    import torch

    import potentials
    from alflow.metrics import GraphCache, evaluate_cached, members_of, model_dtype

    torch.set_num_threads(1)
    test = avr.held_out_set("cuni", args.test_md, args.test_defects, 7919)
    position = {id(a): i for i, a in enumerate(test)}
    groups = {k: [position[id(a)] for a in v] for k, v in sorted(groups_of(test).items())}
    cache = None  # the test frames' neighbor lists, built once for every run and group
    for spec in args.runs:
        run, _, labels = spec.rpartition(":")
        model = potentials.load(committee_at(Path(run), int(labels)), device="cpu")
        if cache is None:
            cache = GraphCache(test, float(members_of(model)[0].cutoff), model_dtype(model), torch.device("cpu"))

        def rmse(indices: list[int]) -> float:
            return round(float(evaluate_cached([model], cache, indices, 16)["forces_rmse"]), 4)

        row: dict[str, Any] = {"run": run, "labels": int(labels), "all": rmse(list(range(len(test))))}
        row.update({k: rmse(v) for k, v in groups.items()})
        row["n"] = {k: len(v) for k, v in groups.items()}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
