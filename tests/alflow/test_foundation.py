"""Starting from a foundation model (issue 15): loading and checks, E0 alignment, readout re-initialisation,
frozen layers, replay against forgetting, the ``model`` oracle and ``alflow run --dry-run``.

The foundation is a stand-in trained here (``benchmarks/foundation.py``: a small SchNet fitted by the
alflow trainer to EMT labels of Cu, Ag, Au, Ni and the CuNi/AgAu alloys); nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from alflow import keys

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("foundation_benchmark", ROOT / "benchmarks" / "foundation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in foundation model (alflow checkpoint), trained once per session (~5 s CPU)."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("foundation") / "standin.pt"
    return _bench().build_standin(path, epochs=25, n_per_system=6)


@pytest.fixture(scope="session")
def cu3au() -> list:
    return _bench().cu3au_test_set(n=10, seed=5)


def _config(tmp_path: Path, standin: Path, structure_symbols: str = "Cu", **potential) -> dict:
    from ase.build import bulk
    from ase.io import write

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    from ase.symbols import string2symbols

    symbols = string2symbols(structure_symbols)
    atoms.symbols[:len(symbols)] = symbols
    write(tmp_path / "start.extxyz", atoms, format="extxyz")
    return {"name": "fnd", "run_dir": str(tmp_path / "run"), "system": {"structures": ["start.extxyz"]},
            "potential": {"foundation": str(standin), **potential}, "labelling": {"oracle": "emt"},
            "execution": {"device": "cpu"}}


# ----------------------------------------------------------------------------- configuration and preflight


def test_foundation_only_settings_need_a_foundation() -> None:
    from alflow.config import ConfigError, config_from_dict

    base = {"name": "x", "system": {"build": {"element": "Cu"}}}
    for field, value in (("freeze", ["embedding"]), ("reinit_readout", True), ("trusted", True)):
        with pytest.raises(ConfigError, match=f"potential.{field}: needs potential.foundation"):
            config_from_dict({**base, "potential": {field: value}})


def test_preflight_names_unknown_species_and_freeze_prefixes(tmp_path: Path, standin: Path) -> None:
    from alflow.config import config_from_dict
    from alflow.preflight import problems

    ok = config_from_dict(_config(tmp_path, standin, "Cu", freeze=["embedding", "interactions.0"]), tmp_path)
    assert not [p for p in problems(ok) if p.startswith("potential")]
    bad = config_from_dict(_config(tmp_path, standin, "PtPd", freeze=["embedding", "interaction.7"]), tmp_path)
    found = [p for p in problems(bad) if p.startswith("potential")]
    assert len(found) == 1 and "Pd, Pt" in found[0] and "no weights" in found[0], found
    bad = config_from_dict(_config(tmp_path, standin, "Cu", freeze=["embedding", "interaction.7"]), tmp_path)
    found = [p for p in problems(bad) if p.startswith("potential")]
    assert len(found) == 1 and "'interaction.7'" in found[0] and "'embedding'" not in found[0], found
    shallow = config_from_dict({**_config(tmp_path, standin, "Cu"), "committee": {"kind": "shallow"}}, tmp_path)
    assert any(p.startswith("committee.kind: 'shallow' cannot start from potential.foundation") for p in problems(shallow))


class _Trap:
    """Unpickling this object writes a marker file: proof that the pickle ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_an_untrusted_model_file_is_never_unpickled(tmp_path: Path) -> None:
    import pickle

    from alflow.config import ConfigError
    from alflow.foundation import load_foundation

    marker = tmp_path / "ran"
    path = tmp_path / "hostile.model"
    path.write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(ConfigError, match="potential.foundation: .*trusted: true"):
        load_foundation(path)
    assert not marker.exists()


@pytest.mark.slow
def test_a_mace_model_file_loads_only_when_trusted(tmp_path: Path) -> None:
    import potentials
    from alflow.config import ConfigError
    from alflow.foundation import load_foundation

    mace = potentials.build("mace", species=[29, 79], cutoff=4.0, hidden_irreps="8x0e + 8x1o", max_ell=2,
                            correlation=2, num_interactions=2, num_radial_basis=4, radial_MLP=[16], MLP_irreps="4x0e")
    with torch.no_grad():
        mace.e0.copy_(torch.tensor([-3.5, -2.9], dtype=mace.e0.dtype))
    path = tmp_path / "mp.model"
    torch.save(mace.to_mace_model(), path)  # what mace_run_train writes: a pickled module
    with pytest.raises(ConfigError, match="trusted: true"):
        load_foundation(path)
    model = load_foundation(path, trusted=True)
    assert model.architecture == "mace" and model.species == [29, 79]
    assert model.e0.tolist() == pytest.approx([-3.5, -2.9])
    assert "model.readouts.0.linear.weight" in dict(model.named_parameters())


# ----------------------------------------------------------------------------- alignment, readouts, freezing


def test_alignment_recovers_a_per_element_offset_of_the_reference(standin: Path, cu3au: list) -> None:
    """E_ref + 0.7 eV per Cu - 0.3 eV per Au: the fitted shift moves by exactly that; applying it moves E0."""
    from alflow.foundation import apply_alignment, fit_alignment, load_foundation, predict

    model = load_foundation(standin)
    frames = [a.copy() for a in cu3au]
    # compositions must differ for the per-element fit to be determined: swap one Cu to Au in half the frames
    for a in frames[::2]:
        a.symbols[1] = "Au"
    plain = fit_alignment(model, frames)
    offset = [a.copy() for a in frames]
    for a in offset:
        a.info[keys.REF_ENERGY] = a.info[keys.REF_ENERGY] + 0.7 * (a.symbols == "Cu").sum() - 0.3 * (a.symbols == "Au").sum()
    shifted = fit_alignment(model, offset)
    assert shifted["shift"]["Cu"] - plain["shift"]["Cu"] == pytest.approx(0.7, abs=1e-6)
    assert shifted["shift"]["Au"] - plain["shift"]["Au"] == pytest.approx(-0.3, abs=1e-6)
    assert shifted["energy_rmse_after"] < shifted["energy_rmse_before"]
    before = [p["energy"] for p in predict(model, frames[:2])]
    apply_alignment(model, shifted)
    after = [p["energy"] for p in predict(model, frames[:2])]
    expect = [sum(shifted["shift"][s] for s in a.get_chemical_symbols()) for a in frames[:2]]
    assert np.subtract(after, before) == pytest.approx(expect, abs=1e-4)


def test_alignment_scale_from_forces(standin: Path, cu3au: list) -> None:
    """References whose forces are the foundation's times 1.3: the fitted scale is 1.3."""
    from alflow.foundation import fit_alignment, load_foundation, predict

    model = load_foundation(standin).double()
    frames = [a.copy() for a in cu3au[:4]]
    for a, p in zip(frames, predict(model, frames)):
        a.arrays[keys.REF_FORCES] = 1.3 * p["forces"]
    assert fit_alignment(model, frames, scale=True)["scale"] == pytest.approx(1.3, rel=1e-9)


def test_reinit_readout_differs_per_member_and_keeps_the_trunk(standin: Path) -> None:
    from alflow.foundation import init_members, load_foundation, readout_parameters

    found = load_foundation(standin)
    members = init_members(found, 3, reinit=True, seed=4)
    names = {n for n, _ in readout_parameters(found)}
    assert names and all(n.startswith("readout") for n in names)
    ref = dict(found.named_parameters())
    for m in members:
        for n, p in m.named_parameters():
            assert torch.equal(p, ref[n]) == (n not in names), n
    r0, r1 = (dict(m.named_parameters()) for m in members[:2])
    assert not any(torch.equal(r0[n], r1[n]) for n in names if ref[n].abs().sum() > 0)
    again = init_members(found, 1, reinit=True, seed=4)[0]
    assert all(torch.equal(p, r0[n]) for n, p in again.named_parameters())  # seeded


def test_frozen_layers_stay_put_in_training(standin: Path, cu3au: list) -> None:
    from alflow.config import TrainingConfig
    from alflow.foundation import build_committee, freeze, init_members, load_foundation
    from alflow.train import train_committee

    found = load_foundation(standin)
    committee = build_committee(found, 2)
    assert freeze(committee, ["embedding", "interactions.0"]) > 0
    before = {n: p.detach().clone() for n, p in committee.members[0].named_parameters()}
    cfg = TrainingConfig(epochs=3, batch_size=4, patience=3, valid_fraction=0.2)
    train_committee(committee, cu3au, cfg, device="cpu", seed=0, progress=False,
                    init_from=init_members(found, 2, reinit=False, seed=0))
    for n, p in committee.members[0].named_parameters():
        frozen = n.startswith("embedding") or n.startswith("interactions.0.")
        assert torch.equal(p, before[n]) == frozen, n


# ----------------------------------------------------------------------------- replay against forgetting


def test_replay_keeps_the_committee_near_the_foundation_far_from_the_new_data(standin: Path, cu3au: list) -> None:
    """Fine-tuned on Cu3Au only, evaluated on held-out pure Ni and Ag (no Cu, no Au): with replay frames
    (labelled by the foundation) the fine-tuned models stay within 0.05 eV/Å force RMSE of the foundation
    there, and less than half as far as without replay."""
    from alflow.config import TrainingConfig
    from alflow.foundation import init_members, load_foundation, predict, replay_frames
    from alflow.train import train_committee

    bench = _bench()
    found = load_foundation(standin)
    far = [a for a in bench.standin_frames(3, seed=99) if set(a.get_chemical_symbols()) in ({"Ni"}, {"Ag"})]
    pool = [a for a in bench.standin_frames(4, seed=7) if set(a.get_chemical_symbols()) <= {"Ni", "Ag", "Cu", "Au"}]
    replay = replay_frames(found, pool, 16, seed=0)
    assert len(replay) == 16 and all(a.info[keys.SOURCE] == "foundation_replay" for a in replay)
    ref = predict(found, far)
    cfg = TrainingConfig(epochs=30, batch_size=4, lr=1e-2, patience=30, valid_fraction=0.2, ema_decay=None)

    def drift(extra: list) -> float:
        members = init_members(found, 1, reinit=False, seed=0)  # trained in place
        result = train_committee(members, cu3au, cfg, device="cpu", seed=0, progress=False,
                                 init_from=[copy.deepcopy(found)], replay=extra, replay_weight=1.0)
        assert len(result.train_idx) + len(result.valid_idx) == len(cu3au)  # replay never enters the split
        got = predict(members[0], far)
        d = np.concatenate([(g["forces"] - r["forces"]).ravel() for g, r in zip(got, ref)])
        return float(np.sqrt(np.mean(d**2)))

    with_replay, without = drift(replay), drift([])
    assert with_replay < 0.1, (with_replay, without)  # measured 0.065 with replay, 0.38 without
    assert with_replay < 0.5 * without, (with_replay, without)


def test_initial_frames_from_foundation_md_are_spread_by_fps(standin: Path, cu3au: list) -> None:
    from alflow.config import FoundationExploreConfig
    from alflow.foundation import explore_initial, load_foundation
    from alflow.select import structure_descriptors

    spec = FoundationExploreConfig(n_frames=4, steps=60, stride=5, temperature=800)
    start = [cu3au[0]]
    picked = explore_initial(load_foundation(standin), start, spec, seed=0)
    assert len(picked) == 4 and all(a.calc is None and keys.REF_ENERGY not in a.info for a in picked)

    def min_gap(frames: list) -> float:
        x = structure_descriptors(frames, species=[29, 79])
        return min(float(np.linalg.norm(x[i] - x[j])) for i in range(len(x)) for j in range(i))

    consecutive = explore_initial(load_foundation(standin), start,
                                  FoundationExploreConfig(n_frames=12, steps=60, stride=5, temperature=800), seed=0)
    assert len(consecutive) == 12  # every snapshot (no more than n_frames): the same trajectory, seed 0
    assert min_gap(picked) > min_gap(consecutive[:4])


# ----------------------------------------------------------------------------- the model oracle and the dry run


@pytest.mark.slow  # label workers are subprocesses: ~50 s on a loaded 2-core machine
def test_model_oracle_labels_like_the_model_in_a_label_worker(tmp_path: Path, standin: Path, cu3au: list) -> None:
    from alflow.calculator import AlflowCalculator
    from alflow.config import LabellingConfig
    from alflow.data import Dataset
    from alflow.label import label_frames
    from alflow.oracles import ORACLES, OracleError, build_calculator, source_of

    assert "model" in ORACLES and source_of("model") == "teacher"
    with pytest.raises(OracleError, match="model_path"):
        build_calculator("model", {}, cu3au[0], directory=tmp_path)
    frames = [a.copy() for a in cu3au[:2]]
    for a in frames:
        for k in (keys.REF_ENERGY, keys.REF_STRESS):
            a.info.pop(k, None)
        a.arrays.pop(keys.REF_FORCES, None)
    ds = Dataset(tmp_path / "ds")
    label_frames(frames, LabellingConfig(oracle="model", parameters={"model_path": str(standin)}), ds,
                 tmp_path / "work", progress=False)
    calc = AlflowCalculator(standin, device="cpu")
    stored = sorted(ds.frames(), key=lambda a: a.positions[1, 0])
    for a in stored:
        b = a.copy()
        b.calc = calc
        assert a.info[keys.REF_ENERGY] == pytest.approx(b.get_potential_energy(), abs=1e-5)
        assert np.abs(a.arrays[keys.REF_FORCES] - b.get_forces()).max() < 1e-4
    assert len(stored) == 2


def test_dry_run_says_what_the_run_would_spend_and_computes_nothing(tmp_path: Path, standin: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    import yaml

    cfg = _config(tmp_path, standin, "Cu")
    cfg.update(loop={"max_iterations": 7}, selection={"max_per_iteration": 5},
               system={**cfg["system"], "initial_rattle": {"n_frames": 4}}, labelling={"oracle": "emt", "retries": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from alflow.cli import main

    assert main(["run", str(path), "--dry-run", "--label-seconds", "60"]) == 0
    text = capsys.readouterr().out
    assert "oracle labels at most: 39" in text  # 4 initial + 5 x 7
    assert "oracle calls at most: 117" in text  # x (1 + 2 retries)
    assert "39 x 60 s" in text
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.extxyz"))


# ----------------------------------------------------------------------------- the loop from a foundation


@pytest.mark.slow
def test_loop_from_a_foundation_aligns_replays_and_reports(tmp_path: Path, standin: Path) -> None:
    import json

    from alflow.config import config_from_dict
    from alflow.foundation import ALIGNMENT_FILE, FOUNDATION_DIR, REPLAY_FILE
    from alflow.loop import read_metrics, run_loop

    cfg = _config(tmp_path, standin, "Au", reinit_readout=True, freeze=["embedding"])
    cfg.update(committee={"size": 2}, loop={"max_iterations": 1},
               system={**cfg["system"], "initial_rattle": {"n_frames": 4},
                       "initial_from_foundation": {"n_frames": 2, "steps": 10, "stride": 5}},
               training={"epochs": 3, "batch_size": 4, "valid_fraction": 0.25, "replay_frames": 3},
               exploration={"walkers": [{"steps": 20, "stride": 10, "temperature": 300}]},
               selection={"max_per_iteration": 2})
    config = config_from_dict(cfg, tmp_path)
    run_loop(config)
    run = tmp_path / "run"
    alignment = json.loads((run / FOUNDATION_DIR / ALIGNMENT_FILE).read_text())
    assert set(alignment["shift"]) == {"Cu", "Au"} and alignment["n_frames"] == 6  # 4 rattled + 2 from MD
    from alflow.data import Dataset

    import ase.io

    from alflow.io import frame_hash

    picked = ase.io.read(run / "initial" / "foundation_md.extxyz", index=":")
    assert len(picked) == 2 and {frame_hash(a) for a in picked} <= Dataset(run / "dataset").hashes
    assert (run / FOUNDATION_DIR / REPLAY_FILE).is_file()
    rows = read_metrics(run)
    assert rows and rows[0]["foundation_e0_shift"] == alignment["shift"]
