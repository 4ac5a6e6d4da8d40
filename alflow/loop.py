"""The active-learning loop as plain functions over a run directory (no Prefect here).

Run directory (``config.run_dir``)::

    config.yaml        the resolved configuration (absolute paths); a resume checks it
    state.json         finished stages with their small result dicts, the run status
    metrics.jsonl      one JSON line per finished iteration (rewritten from state.json)
    dataset/           alflow.data.Dataset: every label of the run
    initial/           rattled.extxyz, labelling scratch/, failures.jsonl, labelled.jsonl
    iter_000/train/    committee.pt, metrics.json, member_<k>/
    iter_000/explore/  one scored extxyz per walker, walkers.json
    iter_000/select/   selected.extxyz, predictions.extxyz, summary.json, scores.json
    iter_000/label/    scratch/, failures.jsonl, labelled.jsonl, errors.json
    iter_000/gate/     gates.json (every GateResult), labelling files of the gates' structures
    report.md, report.html, report/*.png     (alflow.report)

State machine: ``initial``, then per iteration i ``train`` → (``gate``, only with
``loop.gates``) → ``explore`` → ``select`` → (stop?) → ``label``. A stage is *finished* only once its record is in
``state.json`` (written atomically: temp file, fsync, rename). ``LoopRun.run_stage``
returns the record of a finished stage without running anything; otherwise the
stage's directory is emptied and the stage computed from scratch, so a kill at
any moment leaves each stage finished or redone. Labelling is the exception:
every label goes into the Dataset as it finishes and a rerun skips frames already
there (``alflow.label``), so no label is lost or made twice.

Stopping is decided after ``select`` of iteration i, with the current config:
``converged`` when the last ``convergence_patience`` iterations each had an
accurate fraction (explored frames below ``selection.lower``, and below
``selection.energy_lower`` when set) ≥ ``convergence_fraction`` with every walker
finishing its steps, and every configured gate (``loop.gates``, ``alflow.gates``) held in
those iterations; else ``max_labels`` when the oracle labels of the run
(initial rattle included, imported frames not) reach ``loop.max_labels``; else
``max_iterations`` at i = max_iterations − 1. A stopping iteration does not
label: the final model is the committee of that iteration, which the
exploration just validated and which was trained on every label (no extra
final training). Raising a limit and rerunning continues the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alflow.errors import InputError, RuntimeFailure
from alflow.results import STAGES, Explored, Gated, Initial, Labelled, RunSummary, Selected, Trained
from alflow.config import (
    ConfigError,
    LoopConfig,
    RunConfig,
    config_to_yaml,
    load_config,
)

STATE, METRICS, CONFIG, LOCK = "state.json", "metrics.jsonl", "config.yaml", ".lock"
# STAGES (the stage table's order) comes from alflow.results
STOP_REASONS = ("converged", "max_iterations", "max_labels")
RESUMABLE_CHANGES = ("loop", "execution", "run_dir", "name")  # top-level keys that may change between sessions
DONE_STATUS = "DONE"  # walker status of a walker that ran all its steps

log = logging.getLogger("alflow.loop")
Executor = Callable[[str, "int | None", dict], dict]


class RunLockedError(RuntimeFailure):
    """Another process is running the loop in this run directory."""


class StageError(RuntimeFailure):
    """A stage cannot produce a usable result (e.g. every label failed)."""


class RunStateError(InputError):
    """A run directory's state.json (or metrics.jsonl) that cannot be read: corrupt, truncated, not this format."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def stage_key(stage: str, iteration: int | None) -> str:
    """``initial`` or ``iter_<i>/<stage>``: the key in state.json and the stage's directory."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    if stage == "initial":
        return "initial"
    if iteration is None or iteration < 0:
        raise ValueError(f"iteration: stage {stage!r} needs an iteration >= 0, got {iteration!r}")
    return f"iter_{iteration:03d}/{stage}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part (``alflow.fileio``;
    an OSError, e.g. a full disk, names ``path``)."""
    from alflow.fileio import atomic_write_text as write

    write(path, text)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def read_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's state.json (an empty state when there is none yet)."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        return {"version": 1, "stages": {}, "iterations": [], "status": "new", "final_model": None, "sessions": []}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunStateError(f"{path}: not readable as an alflow run state ({err}); it is written atomically, so "
                            "something else changed it: restore it from a backup, or start a new run_dir") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict) \
            or not isinstance(state.get("iterations"), list):
        raise RunStateError(f"{path}: not an alflow run state (expected a JSON object with 'stages' and "
                            "'iterations'); restore it from a backup, or start a new run_dir")
    return state


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl, one per finished iteration."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunStateError(f"{path}, line {n}: not a JSON row ({err}); it is rewritten from state.json "
                                    "by the next `alflow run`") from None
    return rows


# ----------------------------------------------------------------------------- convergence


def explored_converged(row: dict[str, Any], loop: LoopConfig) -> bool:
    """The explored-frame criterion: accurate fraction ≥ convergence_fraction and every walker DONE."""
    statuses = row.get("walker_status") or {}
    all_done = bool(statuses) and set(statuses) == {DONE_STATUS}
    return row.get("n_explored", 0) > 0 and row["accurate_fraction"] >= loop.convergence_fraction and all_done


def gates_held(row: dict[str, Any], loop: LoopConfig) -> bool:
    """Every gate configured in ``loop.gates`` held in this iteration (``row['gates']``); True without gates."""
    done = row.get("gates") or {}
    return all((done.get(name) or {}).get("passed") is True for name in loop.gates.configured())


def is_converged(row: dict[str, Any], loop: LoopConfig) -> bool:
    """One iteration is converged: the explored-frame criterion holds and so does every configured gate."""
    return explored_converged(row, loop) and gates_held(row, loop)


def gate_fields(gate: Gated | dict | None) -> dict[str, Any]:
    """The metrics.jsonl fields of one iteration's gate stage: per gate passed, errors, tolerances, ratio."""
    if gate is None:
        return {}
    gate = Gated.from_dict(gate)
    def scalars(values: dict[str, Any] | None) -> dict[str, float]:  # V0, B, C11, ... (no curves or matrices)
        return {k: v for k, v in (values or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    return {"gates": {g["name"]: {**{k: g.get(k) for k in ("passed", "errors", "tolerances", "ratio", "message")},
                                  "model": scalars(g.get("model")), "reference": scalars(g.get("reference"))}
                      for g in gate.gates},
            "gates_passed": gate.passed, "gate_labels": gate.n_labelled,
            "seconds_gate": gate.seconds}


def describe_gates(row: dict[str, Any]) -> str:
    """'eos held (...), elastic FAILED (...)' for a log line (alflow.gates.GateResult.describe)."""
    from alflow.gates import GateResult

    return "; ".join(GateResult(name=n, passed=bool(g.get("passed")), errors=g.get("errors") or {},
                                tolerances=g.get("tolerances") or {}, message=g.get("message") or "").describe()
                     for n, g in (row.get("gates") or {}).items())


def stop_reason(history: list[dict[str, Any]], loop: LoopConfig, labels_total: int) -> str | None:
    """Why the loop stops after the last row of ``history`` (its select stage), or None to go on labelling.

    ``labels_total``: oracle labels of the run so far (before the last iteration's labelling).
    """
    if not history:
        return None
    patience = loop.convergence_patience
    recent = history[-patience:]
    if len(recent) == patience and all(is_converged(r, loop) for r in recent):
        return "converged"
    if loop.max_labels is not None and labels_total >= loop.max_labels:
        return "max_labels"
    if history[-1]["iteration"] + 1 >= loop.max_iterations:
        return "max_iterations"
    return None


def iteration_row(iteration: int, train: Trained | dict, explore: Explored | dict, select: Selected | dict,
                  label: Labelled | dict | None, labels_before: int, loop: LoopConfig,
                  gate: Gated | dict | None = None) -> dict[str, Any]:
    """The metrics.jsonl row of one iteration from its stage results (typed, or their stored dicts; eV, eV/Å, s).

    ``labels_before``: oracle labels before this iteration's labelling (the gate stage's included)."""
    train, explore, select = Trained.from_dict(train), Explored.from_dict(explore), Selected.from_dict(select)
    label = Labelled.from_dict(label) if label is not None else None
    n = select.n_frames
    row = {
        "iteration": iteration,
        "dataset_size": train.n_frames,
        "train_seconds": train.seconds,
        "train_epochs": train.train_epochs,  # epochs summed over the members (alflow.train)
        "train_fit_seconds": train.train_seconds,  # of train_seconds, the training itself
        "alpha": train.alpha,
        "valid_energy_mae": train.valid.get("energy_mae"),
        "valid_forces_rmse": train.valid.get("forces_rmse"),
        "n_walkers": len(explore.walkers),
        "walker_status": dict(explore.statuses),
        "n_explored": n,
        "accurate_fraction": select.n_accurate / n if n else 0.0,
        "candidate_fraction": select.n_candidate / n if n else 0.0,
        "failed_fraction": select.n_failed / n if n else 0.0,
        "n_selected": select.n_selected,
        "labelled": label is not None,
        "labels_added": label.n_labelled if label else 0,
        "label_failures": label.n_failed if label else 0,
        "labels_total": labels_before + (label.n_labelled if label else 0),
        "new_forces_rmse": label.forces_rmse if label else None,
        "new_max_force_error": label.max_force_error if label else None,
        "seconds": {"train": train.seconds, "explore": explore.seconds, "select": select.seconds,
                    "label": label.seconds if label else 0.0},
    }
    row.update(calibration_row(train, label))
    row.update(gate_fields(gate))
    row["explored_converged"] = explored_converged(row, loop)
    row["converged"] = is_converged(row, loop)
    row["stop"] = None
    return row


def calibration_row(train: Trained, label: Labelled | None) -> dict[str, Any]:
    """Calibration metrics of one iteration (alflow.calibration): on the frames labelled in it (held out from
    the map: ``calib_*`` after, ``calib_*_raw`` before) and the trust-window coverage on the validation frames."""
    held = (label.calibration if label is not None else {}) or {}
    after, before = held.get("calibrated") or {}, held.get("raw") or {}
    valid = ((train.calibration or {}).get("valid") or {}).get("calibrated") or {}
    return {"calib_spearman": after.get("spearman"), "calib_spearman_raw": before.get("spearman"),
            "calib_miscalibration_area": after.get("miscalibration_area"),
            "calib_miscalibration_area_raw": before.get("miscalibration_area"),
            "calib_nll": after.get("nll"), "calib_nll_raw": before.get("nll"),
            "trust_coverage": valid.get("coverage"), "trust_coverage_frames": valid.get("n_trusted")}


# ----------------------------------------------------------------------------- the run directory


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys that differ between two configs, outside the sections a resume may change."""
    a = {k: v for k, v in old.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}
    b = {k: v for k, v in new.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


class LoopRun:
    """One session on a run directory: holds its lock, reads and records state.json.

    Open with ``LoopRun.open(config)`` (a context manager). Only this object writes
    state.json; stage computations (``alflow.stages.compute_stage``) may run anywhere that sees
    the run directory (a thread, a process, a Dask worker).
    """

    def __init__(self, config: RunConfig, state: dict[str, Any], session: int) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.state = state
        self.session = session

    @classmethod
    @contextlib.contextmanager
    def open(cls, config: RunConfig, *, force: bool = False, engine: str = "plain") -> Iterator[LoopRun]:
        """Lock ``config.run_dir``, check the config against the stored one, record a new session.

        A config that differs outside ``name``, ``run_dir``, ``loop`` and ``execution`` is
        an error (ConfigError naming the keys) unless ``force``.
        """
        from alflow.preflight import preflight

        preflight(config)  # before the run directory exists: nothing is spent on a config that cannot run here
        run_dir = Path(config.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise RunLockedError(
                    f"{run_dir}: another alflow run (pid {holder}) is using this run directory") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            changed: list[str] = []
            stored = run_dir / CONFIG
            if stored.is_file():
                changed = config_changes(load_config(stored), config)
                if changed and not force:
                    raise ConfigError(
                        f"{run_dir}: the configuration differs from the one this run started with ({stored}) in: "
                        f"{', '.join(changed)}. Only name, run_dir, loop and execution may change on a resume; "
                        "use a new run_dir, or --force to continue anyway", errors=changed, path=stored)
            atomic_write_text(stored, f"# alflow run configuration '{config.name}' (all defaults resolved)\n"
                              + config_to_yaml(config))
            state = read_state(run_dir)
            state.setdefault("sessions", []).append(
                {"started": now(), "pid": os.getpid(), "engine": engine, "config_changes": changed})
            state.update(name=config.name, run_dir=str(run_dir))
            run = cls(config, state, len(state["sessions"]) - 1)
            run._write()
            yield run
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- state ----------------------------------------------------------------------------------
    def _write(self) -> None:
        self.state["updated"] = now()
        atomic_write_text(self.run_dir / STATE, json_text(self.state))
        rows = "".join(json.dumps(r, default=str) + "\n" for r in self.state["iterations"])
        atomic_write_text(self.run_dir / METRICS, rows)

    def record(self, stage: str, iteration: int | None) -> dict[str, Any] | None:
        return self.state["stages"].get(stage_key(stage, iteration))

    def result(self, stage: str, iteration: int | None) -> dict[str, Any] | None:
        rec = self.record(stage, iteration)
        return None if rec is None else rec["result"]

    def path(self, relative: str | None) -> str | None:
        """Absolute path of a run-directory-relative path from a stage result."""
        return None if relative is None else str(self.run_dir / relative)

    def run_stage(self, stage: str, iteration: int | None, inputs: dict[str, Any],
                  executor: Executor | None = None) -> dict[str, Any]:
        """The stage's recorded result when it finished before; else compute it and record it."""
        key = stage_key(stage, iteration)
        done = self.state["stages"].get(key)
        if done is not None:
            log.info("%s: finished in session %s at %s, not recomputed", key, done["session"], done["finished"])
            return done["result"]
        started, t0 = now(), time.perf_counter()
        run = executor or (lambda s, i, inp: _compute(self.run_dir, s, i, inp))
        try:
            result = run(stage, iteration, inputs)
        except BaseException as err:
            self.state.setdefault("failures", []).append(
                {"stage": key, "session": self.session, "time": now(), "error": f"{type(err).__name__}: {err}"[:2000]})
            self._write()
            raise
        self.state["stages"][key] = {"stage": stage, "iteration": iteration, "session": self.session,
                                     "started": started, "finished": now(),
                                     "seconds": time.perf_counter() - t0, "result": result}
        self._write()
        return result

    def failed_before(self, stage: str, iteration: int | None) -> bool:
        """Whether this stage failed in an earlier session (then labelling retries its failed frames)."""
        key = stage_key(stage, iteration)
        return any(f["stage"] == key and f["session"] < self.session for f in self.state.get("failures", []))

    def finish_iteration(self, row: dict[str, Any], stop: str | None = None, final_model: str | None = None) -> None:
        """Store iteration ``row`` (rows after it are dropped: a replay re-adds them) and the run status."""
        i = row["iteration"]
        from alflow.foundation import metrics_fields

        row = {**row, **metrics_fields(self.run_dir), "stop": stop}  # the foundation's E0 alignment, if any
        self.state["iterations"] = [r for r in self.state["iterations"] if r["iteration"] < i] + [row]
        self.state["status"] = stop or "running"
        self.state["final_model"] = final_model if stop else None
        if stop:
            self.state["finished"] = now()
        self._write()

    def summary(self) -> RunSummary:
        """Status, iterations, labels, dataset size, final model (absolute), run dir (``alflow.results.RunSummary``)."""
        rows = self.state["iterations"]
        initial = Initial.from_dict(self.result("initial", None) or {})
        return RunSummary(
            name=self.config.name,
            status=self.state["status"],
            iterations=len(rows),
            labels=rows[-1]["labels_total"] if rows else initial.n_labelled,
            dataset_size=rows[-1]["dataset_size"] if rows else initial.dataset_size,
            final_model=self.path(self.state.get("final_model")),
            run_dir=str(self.run_dir),
            sessions=len(self.state["sessions"]),
        )


# ----------------------------------------------------------------------------- the driver


def drive(run: LoopRun, executor: Executor | None = None, say: Callable[[str], None] | None = None) -> RunSummary:
    """Run (or replay) the loop to its stop; finished stages come from state.json. Returns ``run.summary()``.

    Stage results are read typed (``alflow.results``): the stored dicts become ``Initial``,
    ``Trained``, ``Explored``, ``Selected``, ``Labelled``.
    """
    say = say or log.info
    cfg = run.config
    initial = Initial.from_dict(
        run.run_stage("initial", None, {"retry_failed": run.failed_before("initial", None)}, executor))
    say(f"initial dataset: {initial.dataset_size} frames ({initial.n_imported} imported, "
        f"{initial.n_labelled} labelled by {cfg.labelling.oracle}, {initial.n_failed} failed)")
    labels_total = initial.n_labelled
    history: list[dict[str, Any]] = []
    i = 0
    while True:
        previous = run.result("train", i - 1) if i > 0 else None
        warm = previous is not None and cfg.training.warm_start
        init_from = run.path(Trained.from_dict(previous).committee) if warm else cfg.potential.checkpoint
        train = Trained.from_dict(
            run.run_stage("train", i, {"species": list(initial.species), "init_from": init_from}, executor))
        say(f"iteration {i}: trained on {train.n_frames} frames in {train.seconds:.1f} s, "
            f"valid force RMSE {train.valid.get('forces_rmse', float('nan')):.4f} eV/Å, alpha {train.alpha:.3g}")
        gate = None
        if cfg.loop.gates.configured():  # the oracle labels of the gates count in the budget (paid once)
            gate = Gated.from_dict(run.run_stage("gate", i, {"model": run.path(train.committee),
                                                              "retry_failed": run.failed_before("gate", i)}, executor))
            labels_total += gate.n_labelled
        explore = Explored.from_dict(run.run_stage("explore", i, {"model": run.path(train.committee)}, executor))
        budget = cfg.selection.max_per_iteration
        if cfg.loop.max_labels is not None:
            budget = max(0, min(budget, cfg.loop.max_labels - labels_total))
        trajectories = [run.path(w.trajectory) for w in explore.walkers if w.frames > 0]
        refine = run.path(gate.refine) if gate is not None and gate.refine else None
        select = Selected.from_dict(run.run_stage("select", i, {"trajectories": trajectories, "budget": budget,
                                                                **({"gate_refine": refine} if refine else {})},
                                                  executor))
        row = iteration_row(i, train, explore, select, None, labels_total, cfg.loop, gate)
        say(f"iteration {i}: {select.n_frames} frames explored ({dict(explore.statuses)}), accurate "
            f"{row['accurate_fraction']:.1%}, candidates {row['candidate_fraction']:.1%}, "
            f"failed {row['failed_fraction']:.1%}; {select.n_selected} selected")
        if gate is not None:
            say(f"iteration {i}: gates ({gate.n_labelled} new oracle labels): {describe_gates(row)}; explored-frame "
                f"criterion {'held' if row['explored_converged'] else 'not met'}")
        reason = stop_reason(history + [row], cfg.loop, labels_total)
        if reason is not None and run.record("label", i) is None:
            run.finish_iteration(row, stop=reason, final_model=train.committee)
            held = f" (explored frames and gates: {describe_gates(row)})" if gate is not None else ""
            say(f"stopped after iteration {i}: {reason}{held}; final model {run.path(train.committee)}")
            return run.summary()
        label = Labelled.from_dict(run.run_stage("label", i, {"selected": run.path(select.selected),
                                                              "predictions": run.path(select.predictions),
                                                              "retry_failed": run.failed_before("label", i)},
                                                 executor))
        labels_total += label.n_labelled
        row = iteration_row(i, train, explore, select, label, labels_total - label.n_labelled, cfg.loop, gate)
        say(f"iteration {i}: {label.n_labelled} labels added, {label.n_failed} failed; dataset "
            f"{label.dataset_size} frames")
        history.append(row)
        run.finish_iteration(row)
        i += 1


def run_loop(config: RunConfig, *, force: bool = False, progress: bool = False, executor: Executor | None = None,
             say: Callable[[str], None] | None = None) -> RunSummary:
    """Run or resume the whole loop in this process (no Prefect); returns the final summary."""
    with LoopRun.open(config, force=force, engine="plain") as run:
        if executor is None:
            def executor(s: str, i: int | None, inp: dict) -> dict:
                return _compute(run.run_dir, s, i, inp, progress=progress)
        return drive(run, executor, say)


def run_is_complete(config: RunConfig) -> bool:
    """Whether the run in ``config.run_dir`` already stopped, and would stop there again under ``config``."""
    state = read_state(config.run_dir)
    rows = state.get("iterations") or []
    if state.get("status") not in STOP_REASONS or not rows or rows[-1].get("stop") is None:
        return False
    last = rows[-1]
    fresh = [{**r, "converged": is_converged(r, config.loop)} for r in rows]
    return stop_reason(fresh, config.loop, last["labels_total"]) is not None


def _compute(run_dir: str | os.PathLike, stage: str, iteration: int | None, inputs: dict[str, Any],
             progress: bool = False) -> dict[str, Any]:
    """``alflow.stages.compute_stage`` (imported here, when a stage runs, to keep the modules acyclic)."""
    from alflow.stages import compute_stage

    return compute_stage(run_dir, stage, iteration, inputs, progress=progress)
