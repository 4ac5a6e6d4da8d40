"""The active-learning loop without Prefect (alflow.loop): a real 2-iteration run on 32-atom Cu with EMT
labels, resume by replay, continuing after raising a limit, locking, config checks, convergence logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alflow.config import ConfigError, LoopConfig, config_from_dict
from alflow.data import Dataset
from alflow.loop import (
    LoopRun,
    RunLockedError,
    StageError,
    is_converged,
    read_metrics,
    read_state,
    run_is_complete,
    run_loop,
    stage_key,
    stop_reason,
)

TINY_SCHNET = {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 10}
TWO_ITERATIONS = ["initial", "iter_000/train", "iter_000/explore", "iter_000/select", "iter_000/label",
                  "iter_001/train", "iter_001/explore", "iter_001/select"]


def tiny_config(run_dir: Path, **sections) -> dict:
    """A 2-iteration run that takes seconds: 2 x tiny SchNet, 4 EMT-labelled rattled 32-atom Cu cells, 1 walker."""
    data = {
        "name": "tiny", "run_dir": str(run_dir), "seed": 0,
        "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}, "supercell": [2, 2, 2],
                   "initial_rattle": {"n_frames": 4}},
        "potential": {"cutoff": 4.0, "hparams": TINY_SCHNET},
        "committee": {"size": 2},
        "training": {"epochs": 3, "batch_size": 4, "valid_fraction": 0.25},
        "exploration": {"walkers": [{"temperature": 300, "steps": 20, "stride": 5}]},
        # every non-exploded frame is a candidate: selection (and so the run's shape) does not hinge on the model
        "selection": {"lower": 0.001, "upper": 1000.0, "max_per_iteration": 2},
        "labelling": {"oracle": "emt", "timeout_s": 120},
        "loop": {"max_iterations": 2},
        "execution": {"device": "cpu", "max_workers": 2},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


def test_two_iterations_end_to_end_then_replay_and_continue(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(tiny_config(run_dir))
    summary = run_loop(cfg)
    assert summary["status"] == "max_iterations" and summary["iterations"] == 2
    state = read_state(run_dir)
    assert list(state["stages"]) == TWO_ITERATIONS
    assert state["final_model"] == "iter_001/train/committee.pt"
    assert summary["final_model"] == str(run_dir / "iter_001/train/committee.pt")
    initial = state["stages"]["initial"]["result"]
    assert initial["n_labelled"] == 4 and initial["species"] == [29]
    label0 = state["stages"]["iter_000/label"]["result"]
    assert label0["n_labelled"] == 2 and label0["n_failed"] == 0 and label0["dataset_size"] == 6
    assert label0["forces_rmse"] > 0 and label0["max_force_error"] >= label0["forces_rmse"]
    assert state["stages"]["iter_001/train"]["result"]["warm_start"] is True
    assert state["stages"]["iter_000/train"]["result"]["warm_start"] is False

    rows = read_metrics(run_dir)
    assert rows == state["iterations"] and [r["iteration"] for r in rows] == [0, 1]
    assert [r["dataset_size"] for r in rows] == [4, 6]
    assert [r["labelled"] for r in rows] == [True, False]  # the stopping iteration does not label
    assert [r["labels_total"] for r in rows] == [6, 6]
    assert [r["stop"] for r in rows] == [None, "max_iterations"]
    for r in rows:
        assert r["n_explored"] == 5 and r["walker_status"] == {"DONE": 1}
        assert r["accurate_fraction"] + r["candidate_fraction"] + r["failed_fraction"] == pytest.approx(1.0)
        assert r["n_selected"] == 2 and r["valid_forces_rmse"] > 0
    for rel in ("iter_000/train/committee.pt", "iter_000/train/metrics.json", "iter_000/explore/walkers.json",
                "iter_000/select/selected.extxyz", "iter_000/select/predictions.extxyz", "iter_000/select/summary.json",
                "iter_000/label/errors.json",
                "initial/rattled.extxyz", "config.yaml"):
        assert (run_dir / rel).is_file(), rel
    errors = json.loads((run_dir / "iter_000/label/errors.json").read_text())
    assert len(errors) == 2 and all(e["max_force_error"] > 0 and e["max_force_deviation"] > 0 for e in errors)
    assert len(Dataset(run_dir / "dataset", create=False)) == 6
    assert run_is_complete(cfg)

    # a rerun replays the records: nothing is recomputed, the result is the same
    mtime = (run_dir / "iter_000/train/committee.pt").stat().st_mtime_ns
    again = run_loop(cfg)
    assert {k: v for k, v in again.items() if k != "sessions"} == {k: v for k, v in summary.items() if k != "sessions"}
    replayed = read_state(run_dir)
    assert replayed["stages"] == state["stages"] and len(replayed["sessions"]) == 2
    assert (run_dir / "iter_000/train/committee.pt").stat().st_mtime_ns == mtime

    # raising max_iterations continues: iteration 1 now labels, iteration 2 trains on its labels and stops
    more = config_from_dict(tiny_config(run_dir, loop={"max_iterations": 3}))
    assert not run_is_complete(more)
    final = run_loop(more)
    assert final["status"] == "max_iterations" and final["iterations"] == 3 and final["dataset_size"] == 8
    stages = read_state(run_dir)["stages"]
    assert list(stages) == [*TWO_ITERATIONS, "iter_001/label", "iter_002/train", "iter_002/explore", "iter_002/select"]
    assert all(stages[k] == state["stages"][k] for k in TWO_ITERATIONS)
    assert [r["labelled"] for r in read_metrics(run_dir)] == [True, True, False]

    # anything but loop/execution changed: refused, naming the key
    other = config_from_dict(tiny_config(run_dir, training={"epochs": 4}))
    with pytest.raises(ConfigError, match="training.epochs"):
        run_loop(other)


def test_the_run_directory_is_locked_and_a_failed_stage_is_not_recorded(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path / "run"))
    calls = []

    def fake(stage, iteration, inputs):
        calls.append((stage, iteration))
        if stage == "explore":
            raise RuntimeError("walkers crashed")
        return {"value": len(calls)}

    with LoopRun.open(cfg) as run:
        with pytest.raises(RunLockedError, match="another alflow run"):
            with LoopRun.open(cfg):
                pass
        assert run.run_stage("train", 0, {}, fake) == {"value": 1}
        assert run.run_stage("train", 0, {}, fake) == {"value": 1}  # recorded: not run again
        with pytest.raises(RuntimeError, match="walkers crashed"):
            run.run_stage("explore", 0, {}, fake)
    assert calls == [("train", 0), ("explore", 0)]
    state = read_state(tmp_path / "run")
    assert list(state["stages"]) == ["iter_000/train"]
    assert state["stages"]["iter_000/train"]["result"] == {"value": 1}
    with LoopRun.open(cfg) as run:  # the lock was released
        assert run.session == 1
    with pytest.raises(ValueError, match="iteration"):
        stage_key("train", None)
    with pytest.raises(ValueError, match="stage"):
        stage_key("fit", 0)


def test_a_failed_labelling_stage_retries_its_frames_in_the_next_session(tmp_path):
    run_dir = tmp_path / "run"
    flaky = {"oracle": "oracle_fixtures:FlakyEMT", "retries": 0,
             "parameters": {"worker_pythonpath": str(Path(__file__).parent), "mixing_beta": 0.7}}
    broken = config_from_dict(tiny_config(run_dir, system={"initial_rattle": {"n_frames": 2}}, labelling=flaky))
    with pytest.raises(StageError, match="at least 2"):
        run_loop(broken)
    state = read_state(run_dir)
    assert state["stages"] == {} and [f["stage"] for f in state["failures"]] == ["initial"]
    assert "0 of 2 rattled frames labelled" in state["failures"][0]["error"]
    with pytest.raises(StageError):  # same session semantics: finally failed frames are not tried again
        with LoopRun.open(broken) as run:
            run.run_stage("initial", None, {"retry_failed": False})
    working = {**flaky, "parameters": {**flaky["parameters"], "mixing_beta": 0.1}}
    fixed = config_from_dict(tiny_config(run_dir, system={"initial_rattle": {"n_frames": 2}}, labelling=working))
    with pytest.raises(ConfigError, match="labelling.parameters.mixing_beta"):
        run_loop(fixed)
    with LoopRun.open(fixed, force=True) as run:  # what drive() passes: the stage failed in an earlier session
        assert run.failed_before("initial", None)
        result = run.run_stage("initial", None, {"retry_failed": run.failed_before("initial", None)})
    assert result["n_labelled"] == 2 and result["n_failed"] == 0
    assert read_state(run_dir)["sessions"][-1]["config_changes"] == ["labelling.parameters.mixing_beta"]


def row(i: int, accurate: float, statuses=None, n: int = 100) -> dict:
    return {"iteration": i, "accurate_fraction": accurate, "n_explored": n, "walker_status": statuses or {"DONE": 4}}


def test_convergence_and_stop_reasons():
    loop = LoopConfig(max_iterations=10, convergence_fraction=0.95, convergence_patience=2, max_labels=100)
    assert is_converged(row(0, 0.95), loop) and not is_converged(row(0, 0.94), loop)
    assert not is_converged(row(0, 1.0, {"DONE": 3, "UNCERTAIN": 1}), loop)  # a walker stopped early
    assert not is_converged(row(0, 1.0, n=0), loop)  # nothing explored proves nothing
    assert stop_reason([], loop, 0) is None
    assert stop_reason([row(0, 0.99)], loop, 10) is None  # patience 2: one converged iteration is not enough
    assert stop_reason([row(0, 0.99), row(1, 0.97)], loop, 10) == "converged"
    assert stop_reason([row(0, 0.99), row(1, 0.5), row(2, 0.99)], loop, 10) is None
    assert stop_reason([row(0, 0.5), row(1, 0.99), row(2, 0.99)], loop, 10) == "converged"
    assert stop_reason([row(0, 0.5)], loop, 100) == "max_labels"
    assert stop_reason([row(0, 0.99), row(1, 0.99)], loop, 100) == "converged"  # converged wins
    assert stop_reason([row(8, 0.5)], loop, 99) is None
    assert stop_reason([row(9, 0.5)], loop, 99) == "max_iterations"
    assert stop_reason([row(0, 0.5)], LoopConfig(max_iterations=1), 0) == "max_iterations"


def test_execution_torch_threads_sets_the_threads_of_every_stage(tmp_path):
    import torch
    import yaml

    from alflow.config import config_from_dict
    from alflow.stages import compute_stage

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = config_from_dict(tiny_config(run_dir, execution={"torch_threads": 1}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = compute_stage(run_dir, "initial", None, {})
        assert torch.get_num_threads() == 1 and out["n_labelled"] == 4
    finally:
        torch.set_num_threads(before)
