"""The loop's stage computations: each stage from scratch in any process, writing under the run directory.

``compute_stage(run_dir, stage, iteration, inputs)`` reads ``run_dir/config.yaml``,
empties the stage's directory (train, explore, select: redone from scratch; initial and
label resume their labels, see ``alflow.label``) and returns a small JSON-serialisable
dict of paths and numbers (``to_dict()`` of the stage's typed result, ``alflow.results``),
which ``alflow.loop.LoopRun.run_stage`` records in ``state.json``. Prefect tasks
(``flows.tasks``) and the plain loop call it alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alflow.config import RunConfig, load_config
from alflow.loop import CONFIG, StageError, atomic_write_text, stage_key
from alflow.loop import json_text
from alflow.results import Explored, Gated, Initial, Labelled, Selected, StageResult, Trained, WalkerRecord

CALIBRATION_FILE = "calibration.json"  # alflow.calibration.FILE: the fitted map next to committee.pt

log = logging.getLogger(__name__)

def compute_stage(run_dir: str | os.PathLike, stage: str, iteration: int | None, inputs: dict[str, Any],
                  *, progress: bool = False) -> dict[str, Any]:
    """Compute one stage from scratch; writes its outputs under ``run_dir/stage_key`` and returns a small dict.

    Reads the configuration from ``run_dir/config.yaml``, so it can run in any process.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG)
    out = run_dir / stage_key(stage, iteration)
    if stage in ("train", "explore", "select"):  # redone from scratch; label/initial resume their labels
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if config.execution.torch_threads is not None:  # process-wide: every stage of this run asks the same
        import torch

        torch.set_num_threads(config.execution.torch_threads)
    t0 = time.perf_counter()
    fn = {"initial": _initial, "train": _train, "gate": _gate, "explore": _explore, "select": _select,
          "label": _label}[stage]
    result: StageResult = fn(config, run_dir, out, iteration, inputs, progress)
    return dataclasses.replace(result, seconds=time.perf_counter() - t0).to_dict()


def status_counts(walkers: Sequence[WalkerRecord]) -> dict[str, int]:
    """How many walkers ended with each status."""
    return dict(Counter(w.status for w in walkers))


def finite(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _rel(path: str | os.PathLike, run_dir: Path) -> str:
    return os.path.relpath(Path(path).resolve(), run_dir.resolve())


def _label_into(frames: list, cfg: RunConfig, ds: Any, workdir: Path, progress: bool,
                retry_failed: bool) -> dict[str, int]:
    """Label ``frames`` into ``ds`` (resuming); counts over these frames: labelled (in the dataset), failed.

    ``retry_failed``: try frames that finally failed before again (the stage failed in an earlier session,
    e.g. a broken oracle since fixed); Prefect's retries within a session do not.
    """
    from alflow.io import frame_hash
    from alflow.label import FAILURES, label_frames, read_failures

    hashes = {frame_hash(a) for a in frames}
    res = label_frames(frames, cfg.labelling, ds, workdir, progress=progress,
                       max_workers=cfg.labelling.max_in_flight or cfg.execution.max_workers,
                       retry_failed=retry_failed)
    stored = hashes & ds.hashes
    final = {r["frame_hash"] for r in read_failures(workdir / FAILURES) if r.get("final")}
    return {"n_frames": len(hashes), "n_labelled": len(stored), "n_failed": len((final & hashes) - stored),
            "n_attempts": res.n_attempts}


def _initial(cfg: RunConfig, run_dir: Path, out: Path, iteration: int | None, inputs: dict, progress: bool) -> Initial:
    """Import ``system.initial_dataset`` and/or label ``system.initial_rattle`` copies of the structures."""
    from ase.data import chemical_symbols

    from alflow.data import Dataset, read_frames
    from alflow.explore.runner import system_structures
    from alflow.explore.structures import random_strain, rattled
    from alflow.io import frame_hash, write_extxyz_atomic
    from alflow.keys import ITERATION, SOURCE

    ds = Dataset(run_dir / "dataset")
    structures = system_structures(cfg.system)
    n_imported = 0
    if cfg.system.initial_dataset is not None:
        ds.import_file(cfg.system.initial_dataset)
        n_imported = len({frame_hash(a) for a in read_frames(cfg.system.initial_dataset)} & ds.hashes)
    counts = {"n_frames": 0, "n_labelled": 0, "n_failed": 0}
    if cfg.system.initial_rattle is not None:
        r = cfg.system.initial_rattle
        rng = np.random.default_rng([cfg.seed, 7])
        frames = []
        for k in range(r.n_frames):
            atoms = rattled(random_strain(structures[k % len(structures)], r.strain, rng), r.stdev, rng)
            atoms.info.update({SOURCE: "rattle", ITERATION: -1})
            frames.append(atoms)
        write_extxyz_atomic(frames, out / "rattled.extxyz")
        counts = _label_into(frames, cfg, ds, out, progress, bool(inputs.get("retry_failed")))
    if cfg.system.initial_from_foundation is not None:  # diverse frames from MD with the foundation (issue 15)
        from alflow.foundation import explore_initial, load_foundation

        picked = explore_initial(load_foundation(cfg.potential.foundation, trusted=cfg.potential.trusted),
                                 structures, cfg.system.initial_from_foundation, cfg.seed)
        for atoms in picked:
            atoms.info.update({SOURCE: "foundation_md", ITERATION: -1})
        write_extxyz_atomic(picked, out / "foundation_md.extxyz")
        more = _label_into(picked, cfg, ds, out, progress, bool(inputs.get("retry_failed")))
        counts = {k: counts.get(k, 0) + more.get(k, 0) for k in ("n_frames", "n_labelled", "n_failed")}
    n = len(ds)
    if n < 2:
        raise StageError(f"the initial dataset has {n} labelled frame(s) ({n_imported} imported, "
                         f"{counts['n_labelled']} of {counts['n_frames']} rattled frames labelled, failures in "
                         f"{out / 'failures.jsonl'}); "
                         "training needs at least 2: set system.initial_dataset or system.initial_rattle.n_frames")
    species = sorted({int(z) for s in structures for z in s.numbers} | {int(z) for a in ds.frames() for z in a.numbers})
    return Initial(n_imported=n_imported, n_rattled=counts["n_frames"], n_labelled=counts["n_labelled"],
                   n_failed=counts["n_failed"], dataset_size=n, species=tuple(species),
                   elements=tuple(chemical_symbols[z] for z in species))


_METRIC_KEYS = ("n_frames", "energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "stress_rmse")


def _train(cfg: RunConfig, run_dir: Path, out: Path, iteration: int, inputs: dict, progress: bool) -> Trained:
    """Train the committee on the whole dataset (warm start from ``inputs['init_from']``), calibrate, save."""
    import torch

    import potentials
    from alflow.data import Dataset
    from alflow.keys import FRAME_HASH
    from alflow.train import train_committee
    from potentials.committee import Committee

    # sorted by content hash: the model does not depend on the order labels arrived in; the split is by
    # content too (stable_split), so a frame an earlier iteration trained on never becomes a validation frame
    frames = sorted(Dataset(run_dir / "dataset").frames(), key=lambda a: a.info[FRAME_HASH])
    pot = cfg.potential
    init_from = inputs.get("init_from")
    replay: list = []
    if pot.foundation is not None:  # members fine-tuned from a foundation model (alflow/foundation.py)
        from alflow.foundation import foundation_start

        committee, init_from, replay = foundation_start(cfg, run_dir, frames, inputs["species"], iteration, init_from)
    elif cfg.committee.kind == "shallow":  # one trunk, K heads (potentials/shallow.py)
        from potentials.shallow import ShallowCommittee

        committee = ShallowCommittee.build(pot.architecture, cfg.committee.heads, inputs["species"], pot.cutoff,
                                           seed=cfg.seed + 1000 * iteration, forces_mode=cfg.committee.shallow_forces,
                                           **pot.hparams)
    else:
        committee = Committee.build(pot.architecture, cfg.committee.size, inputs["species"], pot.cutoff,
                                    seed=cfg.seed + 1000 * iteration, **pot.hparams)
    committee.to(getattr(torch, pot.dtype))
    result = train_committee(committee, frames, cfg.training, bootstrap=cfg.committee.bootstrap,
                             device=cfg.execution.device, dtype=pot.dtype, seed=cfg.seed, out_dir=out,
                             progress=progress, init_from=init_from, stable_split=True,
                             **({"replay": replay, "replay_weight": cfg.training.replay_weight} if replay else {}))
    alpha, note, calibration = 1.0, None, {}
    if cfg.committee.calibrate:
        committee.eval()
        cmap, calibration = _recalibrate(cfg, run_dir, iteration, committee, [frames[k] for k in result.valid_idx])
        alpha, note = cmap.alpha, cmap.note
        cmap.save(out / CALIBRATION_FILE)
        if note:
            log.warning("iteration %s: %s", iteration, note)
    potentials.save(committee, out / "committee.pt")
    metrics = {split: {k: m[k] for k in _METRIC_KEYS if m.get(k) is not None} for split, m in result.metrics.items()}
    return Trained(committee=_rel(out / "committee.pt", run_dir), n_frames=len(frames), n_train=len(result.train_idx),
                   n_valid=len(result.valid_idx), n_test=len(result.test_idx), alpha=float(alpha),
                   calibration_note=note, warm_start=init_from is not None, train_seconds=result.seconds,
                   train_epochs=sum(m.epochs for m in result.members), members_mode=result.extra.get("members_mode"),
                   valid=metrics.get("valid", {}), train=metrics.get("train", {}), test=metrics.get("test", {}),
                   members=tuple({"epochs": m.epochs, "best_epoch": m.best_epoch, "stop_reason": m.stop_reason,
                                  "seconds": m.seconds} for m in result.members), calibration=calibration)


def _recalibrate(cfg: RunConfig, run_dir: Path, iteration: int, committee: Any, valid: list) -> tuple[Any, dict]:
    """Refit the calibration map on the validation frames and every frame labelled in earlier iterations."""
    from alflow.calibration import PAIRS_FILE, read_pairs, recalibrate

    history = [read_pairs(p) for j in range(iteration)
               if (p := run_dir / stage_key("label", j) / PAIRS_FILE).is_file()]
    c = cfg.committee
    return recalibrate(committee, valid, history, iteration, kind=c.calibration, decay=c.calibration_decay,
                       min_atoms=c.calibration_min_atoms, min_frames=c.calibration_min_frames,
                       lower=cfg.selection.lower, target=c.trust_target)


def _calibrate_frames(frames: list, path: Path) -> None:
    """Apply the iteration's calibration map (``path``) to scored frames in place: per-atom and max deviation.

    The raw (α = 1) deviations are kept (``raw_force_deviation``, ``raw_max_force_deviation``) for the
    calibration pairs of the label stage. Without a map the engine's α-scaled scores stay as they are.
    """
    from alflow.calibration import RAW_FORCE_DEVIATION, RAW_MAX_FORCE_DEVIATION, CalibrationMap
    from alflow.explore.frames import ALPHA
    from alflow.keys import FORCE_DEVIATION, MAX_FORCE_DEVIATION

    cmap = CalibrationMap.load(path) if path.is_file() else None
    for atoms in frames:
        if FORCE_DEVIATION not in atoms.arrays:
            continue
        raw = np.asarray(atoms.arrays[FORCE_DEVIATION], float) / float(atoms.info.get(ALPHA, 1.0))
        atoms.arrays[RAW_FORCE_DEVIATION] = raw
        atoms.info[RAW_MAX_FORCE_DEVIATION] = float(raw.max()) if raw.size else 0.0
        if cmap is not None and raw.size:
            calibrated = cmap.apply(raw, atoms.numbers)
            atoms.arrays[FORCE_DEVIATION] = calibrated
            atoms.info[MAX_FORCE_DEVIATION] = float(calibrated.max())


def gate_structure(cfg: RunConfig, spec: Any) -> Any:
    """The structure a gate starts from: ``spec.structure``, else the first system structure (Å)."""
    from alflow.explore.runner import system_structures
    from alflow.explore.structures import read_structure

    return read_structure(spec.structure) if spec.structure is not None else system_structures(cfg.system)[0]


def _gate(cfg: RunConfig, run_dir: Path, out: Path, iteration: int, inputs: dict, progress: bool) -> Gated:
    """Evaluate every configured gate (``loop.gates``, ``alflow.gates``) with the committee ``inputs['model']``.

    The oracle half goes through labelling: the gates' structures are labelled into the dataset (counted
    in the budget, kept for training) and the reference property is computed from those labels; the
    structures are the same every iteration, so only the first evaluation pays the oracle. Writes
    ``gates.json`` (every GateResult) in the stage directory.
    """
    from alflow import gates as G
    from alflow.calculator import AlflowCalculator
    from alflow.data import Dataset
    from alflow.io import frame_hash, write_extxyz_atomic
    from alflow.keys import FRAME_HASH, ITERATION, SOURCE

    ds = Dataset(run_dir / "dataset")
    specs = cfg.loop.gates.configured()
    todo = {}
    for name, spec in specs.items():
        if name == "rdf":  # an MD gate: its oracle frames come from an MD run, not from labelling structures
            continue
        atoms = gate_structure(cfg, spec)
        frames = G.structures(name, spec, atoms)
        for a in frames:
            a.info.update({SOURCE: f"gate:{name}", ITERATION: iteration})
        todo[name] = (spec, atoms, frames)
    every = [a for _, _, frames in todo.values() for a in frames]
    hashes = {frame_hash(a) for a in every}
    before = len(hashes & ds.hashes)
    counts = (_label_into(every, cfg, ds, out, progress, bool(inputs.get("retry_failed"))) if every
              else {"n_failed": 0})
    by_hash = {a.info[FRAME_HASH]: a for a in ds.frames() if a.info.get(FRAME_HASH) in hashes}
    calc = AlflowCalculator(inputs["model"], device=cfg.execution.device)
    results = []
    for name, (spec, atoms, frames) in todo.items():
        labelled = [by_hash.get(frame_hash(a)) for a in frames]
        missing = sum(a is None for a in labelled)
        if missing:
            results.append(G.GateResult(name=name, passed=False, errors={}, tolerances={}, message=(
                f"{missing} of {len(frames)} gate structures have no oracle label (see {out / 'failures.jsonl'})")))
            continue
        try:
            reference = G.quantity(name, spec, atoms, G.from_labels(labelled))
            model = G.quantity(name, spec, atoms, G.evaluate(frames, calc, stress=name == "elastic"))
            results.append(G.compare(name, spec, model, reference))
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as err:  # e.g. an E-V fit without a minimum
            results.append(G.GateResult(name=name, passed=False, errors={}, tolerances={},
                                        message=f"{type(err).__name__}: {err}"[:500]))
    n_new = len(hashes & ds.hashes) - before
    n_frames, n_failed = len(hashes), counts["n_failed"]
    n_refine = cfg.loop.gates.refine
    refine = [f for r, (spec, atoms, _) in zip(results, todo.values()) if not r.passed
              for f in G.refinement_frames(r.name, spec, atoms, n_refine, seed=cfg.seed + 7717 * (iteration + 1))]
    if "rdf" in specs:
        result, stored, new, model_frames = _rdf_gate(cfg, specs["rdf"], ds, out, iteration, calc)
        results.append(result)
        n_frames, n_new, n_failed = n_frames + stored, n_new + new, n_failed + (0 if result.model or stored else 1)
        if not result.passed and model_frames:  # the committee's own MD frames, evenly spaced
            pick = np.linspace(0, len(model_frames) - 1, min(n_refine, len(model_frames))).round().astype(int)
            refine += [model_frames[int(i)] for i in dict.fromkeys(pick.tolist())]
    for r in results:
        log.info("iteration %s: gate %s", iteration, r.describe())
    atomic_write_text(out / "gates.json", json_text([r.to_dict() for r in results]))
    refine_file = None
    if refine:
        for a in refine:
            a.calc = None
            a.info = {SOURCE: "gate-refine", ITERATION: iteration}
            for key in [k for k in a.arrays if k not in ("numbers", "positions")]:
                del a.arrays[key]
        write_extxyz_atomic(refine, out / "refine.extxyz")
        refine_file = _rel(out / "refine.extxyz", run_dir)
    return Gated(gates=tuple(r.to_dict() for r in results), passed=all(r.passed for r in results),
                 n_frames=n_frames, n_labelled=n_new, n_failed=n_failed, dataset_size=len(ds), refine=refine_file)


def _rdf_gate(cfg: RunConfig, spec: Any, ds: Any, out: Path, iteration: int, calc: Any) -> tuple[Any, int, int, list]:
    """The rdf gate (alflow.gates, alflow.gate_md): (GateResult, oracle frames it uses, new labels stored,
    the committee's sampled MD frames).

    The oracle's MD runs once: its sampled frames are stored in the dataset with ``gate_key`` (start
    structure, MD settings, oracle settings) and found there by later iterations. A failed or killed
    oracle run keeps the frames it sampled (labels) and fails the gate; the next iteration runs it again.
    """
    from alflow import gates as G
    from alflow.gate_md import run_isolated, sample
    from alflow.io import frame_hash
    from alflow.keys import ITERATION, LABELLER, SOURCE
    from alflow.label import oracle_key
    from alflow.oracles import source_of
    from alflow.secrets import redact

    start = G.structures("rdf", spec, gate_structure(cfg, spec))[0]
    md = G.rdf_md(spec)
    lab = cfg.labelling
    settings = (lab.oracle, redact(lab.parameters), lab.kpoint_density)
    key = oracle_key(*settings, extra=["rdf", frame_hash(start), md])
    mine = [a for a in ds.frames() if a.info.get("gate_key") == key]
    new = 0
    failure = ""
    if len(mine) < md["samples"]:
        try:
            frames = run_isolated(start, lab, {**md, "stress": True}, out / "rdf_oracle_md", spec.timeout_s)
        except RuntimeError as err:
            failure = str(err)[:1500]
            from ase.io import read

            partial = out / "rdf_oracle_md" / "frames.extxyz"
            frames = list(read(partial, index=":")) if partial.is_file() and partial.stat().st_size else []
        for a in frames:
            a.info.update({"gate_key": key, "origin": "gate:rdf", ITERATION: iteration, LABELLER: lab.oracle,
                           SOURCE: source_of(lab.oracle), "oracle_key": oracle_key(*settings)})
        before = len(ds)
        if frames:
            ds.append(frames)
        new = len(ds) - before
        mine = frames if not failure else []
    if failure or not mine:
        return (G.GateResult(name="rdf", passed=False, errors={}, tolerances={},
                             message=f"the oracle's MD did not finish: {failure}" if failure else "no oracle MD frames"),
                len(mine), new, [])
    model_frames: list = []
    try:
        model_frames = sample(start, calc, md)
        model = G.quantity("rdf", spec, start, model_frames)
        result = G.compare("rdf", spec, model, G.quantity("rdf", spec, start, mine))
    except (ValueError, RuntimeError) as err:  # e.g. the committee's MD exploded
        result = G.GateResult(name="rdf", passed=False, errors={}, tolerances={},
                              message=f"{type(err).__name__}: {err}"[:500])
    return result, len(mine), new, model_frames


def _explore(cfg: RunConfig, run_dir: Path, out: Path, iteration: int, inputs: dict, progress: bool) -> Explored:
    """Run every walker with the committee; one scored trajectory per walker."""
    from alflow.explore.runner import explore

    results = explore(cfg, inputs["model"], out, iteration=iteration, device=cfg.execution.device, progress=progress)
    walkers = tuple(WalkerRecord(name=w["name"], status=w["status"], steps=int(w["steps"]), frames=int(w["frames"]),
                                 trajectory=_rel(w["trajectory"], run_dir),
                                 max_force_deviation=w.get("max_force_deviation"),
                                 message=str(w.get("message", ""))[:500], seconds=float(w.get("seconds", 0.0)))
                    for w in results)
    if walkers and all(w.status == "ERROR" for w in walkers):
        raise StageError(f"iteration {iteration}: every walker failed; first error: {walkers[0].message}")
    return Explored(walkers=walkers, statuses=status_counts(walkers), n_frames=sum(w.frames for w in walkers))


def _select(cfg: RunConfig, run_dir: Path, out: Path, iteration: int, inputs: dict, progress: bool) -> Selected:
    """Classify the explored frames and choose the ones to label (``alflow.select``)."""
    from alflow.data import Dataset
    from alflow.io import frame_hash, write_extxyz_atomic
    from alflow.keys import (
        ENERGY_DEVIATION_PER_ATOM,
        ITERATION,
        MAX_FORCE_DEVIATION,
        PRED_FORCES,
        WALKER,
    )
    from alflow.select import load_scored, select_frames

    trajectories = load_scored([p for p in inputs["trajectories"] if Path(p).is_file()])
    for trajectory in trajectories:
        for atoms in trajectory:
            atoms.info[ITERATION] = iteration
        if cfg.committee.calibrate:
            _calibrate_frames(trajectory, run_dir / stage_key("train", iteration) / CALIBRATION_FILE)
    dataset = Dataset(run_dir / "dataset")
    selection = select_frames(trajectories, cfg.selection, dataset, seed=cfg.seed + iteration,
                              budget=inputs["budget"])
    selected = predictions = None
    frames = [a for t in trajectories for a in t]
    room = max(0, selection.summary["budget"] - len(selection.frames))  # the budget select_frames applied
    from_gates = _gate_refinement(inputs.get("gate_refine"), dataset, room)
    if selection.frames or from_gates:
        write_extxyz_atomic([*selection.frames, *from_gates], out / "selected.extxyz")
        selected = _rel(out / "selected.extxyz", run_dir)
        # the committee's predictions for the selected frames (selected.extxyz carries none, so that no
        # prediction is ever read back as a label): the label stage measures the true errors with them
        explored = {frame_hash(a): a for a in frames if PRED_FORCES in a.arrays}
        predicted = [explored[h] for h in (frame_hash(a) for a in selection.frames) if h in explored]
        if predicted:
            write_extxyz_atomic(predicted, out / "predictions.extxyz")
            predictions = _rel(out / "predictions.extxyz", run_dir)
    scores = {"lower": cfg.selection.lower, "upper": cfg.selection.upper,
              MAX_FORCE_DEVIATION: [float(a.info.get(MAX_FORCE_DEVIATION, np.nan)) for a in frames],
              ENERGY_DEVIATION_PER_ATOM: [float(a.info.get(ENERGY_DEVIATION_PER_ATOM, np.nan)) for a in frames],
              WALKER: [str(a.info.get(WALKER, "")) for a in frames]}
    atomic_write_text(out / "scores.json", json.dumps(scores).replace("NaN", "null"))
    atomic_write_text(out / "summary.json", json_text(selection.summary))
    s = selection.summary
    return Selected(n_frames=s["n_frames"], n_accurate=s["n_accurate"], n_candidate=s["n_candidate"],
                    n_failed=s["n_failed"], n_selected=s["n_selected"] + len(from_gates), adaptive=s["adaptive"],
                    budget=s["budget"], rejections=dict(s["rejections"]), selected=selected, predictions=predictions,
                    n_from_gates=len(from_gates))


def _gate_refinement(path: str | None, dataset: Any, room: int) -> list:
    """Up to ``room`` frames of the gate stage's ``refine.extxyz`` (loop.gates.refine) not yet in ``dataset``."""
    if not path or room <= 0 or not Path(path).is_file():
        return []
    from ase.io import read

    from alflow.io import frame_hash

    have = dataset.hashes
    fresh = [a for a in read(path, index=":") if frame_hash(a) not in have]
    return fresh[:room]


def _rms(values: Any) -> float | None:
    return None if values is None or np.size(values) == 0 else finite(np.sqrt(np.mean(np.square(values))))


def prediction_errors(predicted: list, dataset_frames: list) -> list[dict[str, Any]]:
    """Committee prediction (``arrays[PRED_FORCES]``, ``info[PRED_ENERGY]``) vs label for each frame now
    in the dataset (eV/Å, eV/atom)."""
    from alflow.io import frame_hash
    from alflow.keys import (
        ENERGY_DEVIATION_PER_ATOM,
        FORCE_DEVIATION,
        FRAME_HASH,
        MAX_FORCE_DEVIATION,
        PRED_ENERGY,
        PRED_FORCES,
        REF_ENERGY,
        REF_FORCES,
        STEP,
        WALKER,
    )

    by_hash = {a.info[FRAME_HASH]: a for a in dataset_frames}
    rows = []
    for atoms in predicted:
        h = frame_hash(atoms)
        ref = by_hash.get(h)
        if ref is None or PRED_FORCES not in atoms.arrays:
            continue
        diff = np.asarray(atoms.arrays[PRED_FORCES], float) - np.asarray(ref.arrays[REF_FORCES], float)
        pred_e = atoms.info.get(PRED_ENERGY)
        rows.append({
            "frame_hash": h, "walker": str(atoms.info.get(WALKER, "")), "step": int(atoms.info.get(STEP, -1)),
            MAX_FORCE_DEVIATION: finite(atoms.info.get(MAX_FORCE_DEVIATION, np.nan)),
            "raw_max_force_deviation": finite(atoms.info.get("raw_max_force_deviation", np.nan)),
            # RMS over the frame's atoms of the per-atom deviation (raw α = 1, and as scored/calibrated) and of
            # |ΔF_i|: like with like for a calibrated committee (E|ΔF_i|² = c_i²), eV/Å
            "raw_rms_force_deviation": _rms(atoms.arrays.get("raw_force_deviation")),
            "rms_force_deviation": _rms(atoms.arrays.get(FORCE_DEVIATION)),
            "rms_force_error": float(np.sqrt(np.mean(np.sum(diff**2, axis=1)))),
            ENERGY_DEVIATION_PER_ATOM: finite(atoms.info.get(ENERGY_DEVIATION_PER_ATOM, np.nan)),
            "max_force_error": float(np.linalg.norm(diff, axis=1).max()),
            "force_rmse": float(np.sqrt(np.mean(diff**2))),
            "energy_error_per_atom": None if pred_e is None
            else (float(pred_e) - float(ref.info[REF_ENERGY])) / len(atoms),
            "sq_sum": float(np.sum(diff**2)), "n_components": int(diff.size),
        })
    return rows


def _label(cfg: RunConfig, run_dir: Path, out: Path, iteration: int, inputs: dict, progress: bool) -> Labelled:
    """Label the selected frames into the dataset (resumable) and measure the committee's true errors on them."""
    import ase.io

    from alflow.data import Dataset

    ds = Dataset(run_dir / "dataset")
    frames = ase.io.read(inputs["selected"], index=":", format="extxyz") if inputs.get("selected") else []
    counts = {"n_frames": 0, "n_labelled": 0, "n_failed": 0}
    if frames:
        counts = _label_into(frames, cfg, ds, out, progress, bool(inputs.get("retry_failed")))
    if frames and counts["n_labelled"] == 0:
        raise StageError(f"iteration {iteration}: labelling failed for all {len(frames)} selected frames; see "
                         f"{out / 'failures.jsonl'}. Fix the oracle and rerun (--force after a config change): "
                         "failed frames are tried again")
    predicted = inputs.get("predictions")
    predicted = ase.io.read(predicted, index=":", format="extxyz") if predicted and Path(predicted).is_file() else []
    dataset_frames = ds.frames() if predicted else []
    errors = prediction_errors(predicted, dataset_frames) if predicted else []
    atomic_write_text(out / "errors.json", json_text(errors))
    n_comp = sum(e["n_components"] for e in errors)
    calibration = _label_pairs(cfg, run_dir, out, iteration, predicted, dataset_frames)
    return Labelled(**counts, dataset_size=len(ds),
                    forces_rmse=float(np.sqrt(sum(e["sq_sum"] for e in errors) / n_comp)) if n_comp else None,
                    max_force_error=max((e["max_force_error"] for e in errors), default=None),
                    calibration=calibration)


def _label_pairs(cfg: RunConfig, run_dir: Path, out: Path, iteration: int, predicted: list,
                 dataset_frames: list) -> dict[str, Any]:
    """Per-atom (raw deviation at selection, true error) pairs of the newly labelled frames -> ``calibration_pairs.json``;
    returns the calibration metrics on them before (α = 1) and after the iteration's map (held out from its fit)."""
    from alflow.calibration import PAIRS_FILE, RAW_FORCE_DEVIATION, CalibrationMap, atom_pairs, metrics, write_pairs
    from alflow.explore.frames import ALPHA
    from alflow.io import frame_hash
    from alflow.keys import FORCE_DEVIATION, FRAME_HASH, PRED_FORCES, REF_FORCES

    by_hash = {a.info[FRAME_HASH]: a for a in dataset_frames}
    raw, err, num, idx = [], [], [], []
    for atoms in predicted:
        ref = by_hash.get(frame_hash(atoms))
        if ref is None or PRED_FORCES not in atoms.arrays or (
                RAW_FORCE_DEVIATION not in atoms.arrays and FORCE_DEVIATION not in atoms.arrays):
            continue
        eps = (atoms.arrays[RAW_FORCE_DEVIATION] if RAW_FORCE_DEVIATION in atoms.arrays
               else np.asarray(atoms.arrays[FORCE_DEVIATION], float) / float(atoms.info.get(ALPHA, 1.0)))
        x, e = atom_pairs(atoms.arrays[PRED_FORCES], ref.arrays[REF_FORCES], eps)
        raw.append(x)
        err.append(e)
        num.append(np.asarray(atoms.numbers))
        idx.append(np.full(len(atoms), len(idx)))
    if not raw:
        return {}
    pairs = {"raw": np.concatenate(raw), "error": np.concatenate(err), "numbers": np.concatenate(num),
             "frame": np.concatenate(idx)}
    write_pairs(out / PAIRS_FILE, pairs, iteration)
    path = run_dir / stage_key("train", iteration) / CALIBRATION_FILE
    cmap = CalibrationMap.load(path) if path.is_file() else None
    target = cfg.committee.trust_target or cfg.selection.lower
    return metrics(pairs["raw"], pairs["error"], pairs["numbers"], pairs["frame"], cmap, cfg.selection.lower, target)
