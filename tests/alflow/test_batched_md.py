"""The batched engine (alflow.md + alflow.explore.batched) against ASE's integrators, in float64.

Force fields: ASE's EMT through :class:`alflow.md.providers.CalculatorProvider` (the same forces
as the ASE runs compared against), a smooth Morse pair potential in torch (cheap enough for
thermostat statistics on 108 atoms), and a small SchNet committee (the real model path).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import read
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.stress import full_3x3_to_voigt_6_stress

from alflow import keys
from alflow.explore.ase_md import WalkerSpec, run_walkers
from alflow.explore.batched import ForceCall, run_batched
from alflow.explore.frames import DONE, ERROR, EXPLODED, UNCERTAIN
from alflow.graph import atoms_to_batch
from alflow.md import integrators
from alflow.md.providers import CalculatorProvider
from alflow.md.state import WalkerSetup, make_state, normal, select, temperature
from alflow.neighbors import edge_vectors
from potentials.committee import Committee


class Morse(torch.nn.Module):
    """Smooth Morse pair potential for Cu (Girifalco & Weizer parameters), eV and Å; forces and stress by autograd."""

    def __init__(self, cutoff: float = 5.0, d: float = 0.3429, a: float = 1.3588, r0: float = 2.866) -> None:
        super().__init__()
        self.cutoff, self.d, self.a, self.r0 = cutoff, d, a, r0
        self.register_buffer("dummy", torch.zeros((), dtype=torch.float64))

    def pair(self, r: torch.Tensor) -> torch.Tensor:
        x = torch.exp(-self.a * (r - self.r0))
        smooth = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0) * (r < self.cutoff)
        return self.d * (x * x - 2 * x) * smooth

    def forward(self, batch: dict, forces: bool = True, stress: bool = False, **_) -> dict:
        with torch.enable_grad():
            pos = batch[keys.POSITIONS].detach().requires_grad_(True)
            eps = torch.zeros_like(batch[keys.CELL], requires_grad=True)
            sym = 0.5 * (eps + eps.transpose(1, 2))
            p = pos + torch.einsum("ni,nij->nj", pos, sym[batch[keys.BATCH]])
            cell = batch[keys.CELL] + torch.bmm(batch[keys.CELL], sym)
            i, j = batch[keys.EDGE_INDEX]
            r = torch.linalg.norm(edge_vectors(p, cell, i, j, batch[keys.SHIFTS], batch[keys.BATCH]), dim=-1)
            e_pair = 0.5 * self.pair(r)
            energy = torch.zeros(cell.shape[0], dtype=pos.dtype).index_add(0, batch[keys.BATCH][i], e_pair)
            g_pos, g_eps = torch.autograd.grad(energy.sum(), [pos, eps])
        volume = torch.linalg.det(batch[keys.CELL]).abs()
        return {keys.ENERGY: energy.detach(), keys.FORCES: -g_pos, keys.STRESS: g_eps / volume[:, None, None]}


def cu(n: int, rattle: float = 0.0, seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def run_states(setups, model, steps, record=None, stress=False, skin=0.0):
    """Low-level loop: make_state, force call, ``steps`` integrator steps; ``record(state)`` after each."""
    call = ForceCall(model, skin, stress=stress)
    state = call(make_state(setups, dtype=torch.float64))
    present = integrators.kinds(state)
    with torch.no_grad():
        for _ in range(steps):
            state = integrators.step(state, call, present)
            if record is not None:
                record(state)
    return state


# ----------------------------------------------------------------------------- NVE


def test_nve_equals_ase_velocity_verlet_over_200_steps(tmp_path):
    atoms = cu(2, rattle=0.05)
    thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(3))
    Stationary(atoms)
    spec = WalkerSpec(atoms=atoms, ensemble="nve", temperature=600.0, timestep=4.0, steps=200, stride=50, seed=0,
                      name="nve", thermalize=False)
    [result] = run_batched([spec], CalculatorProvider(EMT, cutoff=3.0), tmp_path, upper=10.0, progress=False,
                           device="cpu", dtype=torch.float64)
    assert result.status == DONE, result.message
    frames = read(result.trajectory, ":")
    reference = atoms.copy()
    reference.calc = EMT()
    dyn = VelocityVerlet(reference, timestep=4.0 * units.fs)
    totals = []
    for frame in frames:
        step = frame.info[keys.STEP]
        dyn.run(step - dyn.nsteps)
        np.testing.assert_allclose(frame.positions, reference.positions, atol=1e-6, rtol=0)
        np.testing.assert_allclose(frame.get_momenta(), reference.get_momenta(), atol=1e-6, rtol=0)
        totals.append(frame.info[keys.PRED_ENERGY] + frame.get_kinetic_energy())
    drift = (max(totals) - min(totals)) / len(atoms)
    print(f"NVE EMT Cu32, dt 4 fs, 200 steps: total-energy spread {drift:.2e} eV/atom")
    assert drift < 5e-4


# ----------------------------------------------------------------------------- thermostats


def _block_error(series: np.ndarray, blocks: int = 10) -> float:
    means = np.array([b.mean() for b in np.array_split(series, blocks)])
    return float(means.std(ddof=1) / np.sqrt(blocks))


@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-nose-hoover", pytest.param("nvt-svr", marks=pytest.mark.slow)])
def test_thermostat_mean_temperature_and_fluctuation(ensemble):
    """108 Cu atoms (Morse), 3 walkers: <T> = T0 within block errors, std(T) = T0 sqrt(2/ndof) within 15 %."""
    target, steps, burn = 500.0, 1500, 300
    setups = [WalkerSetup(atoms=cu(3), ensemble=ensemble, temperature=target, pressure=None, timestep=5.0, steps=steps,
                          seed=s, friction=0.02, tdamp_steps=20) for s in range(3)]
    series = []
    run_states(setups, Morse(cutoff=4.0), steps, record=lambda st: series.append(temperature(st).numpy().copy()))
    t = np.array(series)[burn:]  # (steps, walkers)
    ndof = 3 * 108 if ensemble == "nvt-langevin" else 3 * 108 - 3
    mean, error = t.mean(), max(_block_error(t.mean(1)), 1e-3 * target)
    assert abs(mean - target) < 4 * error + 0.005 * target, (mean, error)
    expected_std = target * np.sqrt(2.0 / ndof)
    measured_std = t.std(axis=0).mean()
    assert measured_std == pytest.approx(expected_std, rel=0.15), (measured_std, expected_std)


class MorseCalculator(Calculator):
    """The torch :class:`Morse` as an ASE calculator, so that ASE's integrators see the very same forces."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Morse) -> None:
        super().__init__()
        self.model = model

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        out = self.model(atoms_to_batch(self.atoms, self.model.cutoff, dtype=torch.float64), stress=True)
        energy = float(out[keys.ENERGY][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out[keys.FORCES].numpy(),
                        "stress": full_3x3_to_voigt_6_stress(out[keys.STRESS][0].numpy())}


@pytest.mark.slow
def test_npt_mean_volume_matches_ase_mtk():
    """Morse Cu, 32 atoms, 600 K, 0 GPa: the batched stochastic cell rescaling and ASE's isotropic MTK
    (same forces and stress) give the same mean volume within error bars."""
    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    steps, burn, dt, temp = 2500, 500, 4.0, 600.0
    model = Morse(cutoff=4.0)
    atoms = cu(2)
    thermalize_momenta(atoms, temperature_K=temp, rng=np.random.default_rng(1))
    atoms.calc = MorseCalculator(model)
    dyn = IsotropicMTKNPT(atoms, timestep=dt * units.fs, temperature_K=temp, pressure_au=0.0, tdamp=100 * units.fs,
                          pdamp=500 * units.fs)
    ase_volumes = []
    for _ in range(steps):
        dyn.run(1)
        ase_volumes.append(atoms.get_volume())
    setups = [WalkerSetup(atoms=cu(2), ensemble="npt-iso", temperature=temp, pressure=0.0, timestep=dt, steps=steps,
                          seed=s, friction=0.01, pdamp_steps=125) for s in range(3)]
    series = []
    run_states(setups, model, steps, stress=True, record=lambda st: series.append(torch.linalg.det(st.cells).numpy().copy()))
    ours = np.array(series)[burn:]
    theirs = np.array(ase_volumes)[burn:]
    error = np.hypot(_block_error(ours.mean(1)), _block_error(theirs))
    print(f"NPT volume: batched {ours.mean():.2f} ± {_block_error(ours.mean(1)):.2f}, ASE MTK {theirs.mean():.2f} "
          f"± {_block_error(theirs):.2f} Å³ (start {cu(2).get_volume():.2f})")
    assert abs(ours.mean() - theirs.mean()) < 4 * error + 2e-3 * theirs.mean()


def test_npt_aniso_moves_cell_lengths_independently():
    setups = [WalkerSetup(atoms=cu(2), ensemble="npt-aniso", temperature=300.0, pressure=[0.0, 5.0], timestep=4.0,
                          steps=60, seed=0, pdamp_steps=20)]
    state = run_states(setups, Morse(), 60, stress=True)
    lengths = torch.linalg.norm(state.cells[0], dim=-1).numpy()
    assert not np.allclose(lengths, lengths[0], rtol=1e-9)
    assert not np.allclose(lengths, 7.22, rtol=1e-6)


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def committee() -> Committee:
    model = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16,
                            n_interactions=2, n_rbf=10)
    model.double()
    for member in model.members:
        member.scale.fill_(0.05)
    return model.eval()


def test_counter_rng_is_standard_normal_and_reproducible():
    seed = torch.tensor([7]).expand(200_000)
    x = normal(seed, torch.tensor(3), 2, torch.arange(200_000))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert torch.equal(x[:10], normal(torch.tensor([7]), torch.tensor(3), 2, torch.arange(10)))
    assert not torch.equal(x[:10], normal(torch.tensor([8]), torch.tensor(3), 2, torch.arange(10)))


def test_a_walker_leaving_does_not_change_the_others(committee):
    """Three Langevin walkers; the middle one leaves at step 10; the others equal their solo runs to 1e-12."""
    atoms = cu(1, rattle=0.02)
    setups = [WalkerSetup(atoms=atoms, ensemble=e, temperature=[300.0, 700.0], pressure=None, timestep=2.0, steps=30,
                          seed=s) for s, e in enumerate(["nvt-langevin", "nvt-langevin", "nvt-svr"])]
    call = ForceCall(committee, 0.0, stress=False)
    state = call(make_state(setups, dtype=torch.float64))
    for step in range(30):
        if step == 10:
            state = select(state, torch.tensor([0, 2]))
            call.nl.reset()
        state = integrators.step(state, call)
    for k, setup in zip((0, 1), (setups[0], setups[2])):
        solo = run_states([setup], committee, 30)
        walker = state.batch == k
        torch.testing.assert_close(state.positions[walker], solo.positions, atol=1e-12, rtol=0)
        torch.testing.assert_close(state.momenta[walker], solo.momenta, atol=1e-12, rtol=0)


def test_skin_pairs_beyond_the_cutoff_do_not_change_schnet(committee):
    """SchNet's cutoff function zeroes pairs beyond the cutoff: a cutoff + skin list gives the same numbers."""
    atoms = cu(2, rattle=0.1)
    near = committee(atoms_to_batch(atoms, 4.0, dtype=torch.float64), forces=True)
    far = committee(atoms_to_batch(atoms, 4.5, dtype=torch.float64), forces=True)
    assert far[keys.ENERGY].shape == near[keys.ENERGY].shape
    torch.testing.assert_close(far[keys.ENERGY], near[keys.ENERGY], atol=1e-10, rtol=0)
    torch.testing.assert_close(far[keys.FORCES], near[keys.FORCES], atol=1e-10, rtol=0)


def test_engine_statuses_and_frames_match_the_ase_engine(tmp_path, committee):
    """The same specs through both engines: the same statuses, steps, frame count and info keys."""
    atoms = cu(1)
    squeezed = atoms.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.3, 0.0, 0.0]
    specs = [WalkerSpec(atoms=atoms, ensemble=e, temperature=[300.0, 600.0], steps=12, stride=4, seed=k,
                        pressure=0.0 if e.startswith("npt") else None, name=f"w{k}-{e}")
             for k, e in enumerate(["nvt-langevin", "nvt-svr", "npt-iso", "nve", "nvt-nose-hoover"])]
    specs.append(WalkerSpec(atoms=squeezed, steps=12, stride=4, name="squeezed"))
    batched = run_batched(specs, committee, tmp_path / "b", upper=10.0, progress=False, device="cpu")
    plain = run_walkers(specs, committee, tmp_path / "a", upper=10.0, progress=False, device="cpu")
    assert [r.status for r in batched] == [r.status for r in plain] == [DONE] * 5 + [EXPLODED]
    assert [r.steps for r in batched] == [r.steps for r in plain]
    assert [r.frames for r in batched] == [r.frames for r in plain]
    for a, b in zip(batched, plain):
        fa, fb = read(a.trajectory, ":"), read(b.trajectory, ":")
        assert [f.info[keys.STEP] for f in fa] == [f.info[keys.STEP] for f in fb]
        assert set(fa[0].info) == set(fb[0].info) and set(fa[0].arrays) == set(fb[0].arrays)
        assert fa[0].info["committee_alpha"] == fb[0].info["committee_alpha"] == pytest.approx(1.0)
        assert [f.info["temperature_K"] for f in fa] == pytest.approx([f.info["temperature_K"] for f in fb])
    # step 0 is the same structure in both engines: the same scores
    f0a, f0b = read(batched[0].trajectory, "0"), read(plain[0].trajectory, "0")
    assert f0a.info[keys.PRED_ENERGY] == pytest.approx(f0b.info[keys.PRED_ENERGY], abs=1e-9)


def test_uncertain_walker_stops_at_patience_and_leaves(tmp_path, committee):
    atoms = cu(1)
    specs = [WalkerSpec(atoms=atoms, steps=30, stride=10, seed=0, name="unsure"),
             WalkerSpec(atoms=atoms, steps=30, stride=10, seed=1, name="other")]
    [unsure] = run_batched(specs[:1], committee, tmp_path / "u", upper=1e-9, patience=3, progress=False, device="cpu")
    # step 0 (perfect crystal) has zero deviation by symmetry; steps 1, 2, 3 are above
    assert unsure.status == UNCERTAIN and unsure.steps == 3
    assert [f.info[keys.STEP] for f in read(unsure.trajectory, ":")] == [0, 3]


@pytest.mark.parametrize("bad", ["temperature", "timestep", "element"])
def test_one_broken_walker_fails_alone_in_the_batched_engine(tmp_path, committee, bad):
    atoms = cu(1)
    broken, settings = atoms.copy(), {}
    if bad == "element":
        broken[0].symbol = "Ag"
    else:
        settings = {bad: float("nan") if bad == "temperature" else float("inf")}
    specs = [WalkerSpec(atoms=atoms, steps=8, stride=4, seed=1, name="good1"),
             WalkerSpec(atoms=broken, steps=8, stride=4, seed=2, name="bad", **settings),
             WalkerSpec(atoms=atoms, steps=8, stride=4, seed=3, name="good2")]
    results = run_batched(specs, committee, tmp_path, upper=10.0, progress=False, device="cpu")
    assert [r.status for r in results] == [DONE, ERROR, DONE], [r.message for r in results]
    assert bad in results[1].message or "Ag" in results[1].message


def test_max_atoms_queues_walkers_and_gives_the_same_frames(tmp_path, committee):
    """Autobatching by atom budget: one walker at a time gives the same trajectories as all at once."""
    atoms = cu(1, rattle=0.02)
    specs = [WalkerSpec(atoms=atoms, steps=10, stride=5, seed=s, name=f"w{s}") for s in range(3)]
    together = run_batched(specs, committee, tmp_path / "all", upper=10.0, progress=False, device="cpu")
    queued = run_batched(specs, committee, tmp_path / "one", upper=10.0, progress=False, device="cpu",
                         max_atoms=len(atoms))
    for a, b in zip(together, queued):
        assert a.status == b.status == DONE
        for x, y in zip(read(a.trajectory, ":"), read(b.trajectory, ":")):
            np.testing.assert_allclose(x.positions, y.positions, atol=1e-9)


# ----------------------------------------------------------------------------- the loop uses it


def _config(exploration: dict):
    from alflow.config import config_from_dict

    return config_from_dict({"name": "t", "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61}},
                             "exploration": exploration})


def test_config_default_engine_is_batched_unless_a_walker_needs_ipi():
    from alflow.config import ConfigError

    assert _config({}).exploration.engine == "batched"
    assert _config({"walkers": [{"ensemble": "npt-aniso", "pressure": [0.0, 1.0, 2.0]}]}).exploration.engine == "batched"
    assert _config({"walkers": [{}, {"ensemble": "pimd"}]}).exploration.engine == "ipi"
    with pytest.raises(ConfigError, match=r"exploration.walkers.1.ensemble: engine 'batched' cannot run"):
        _config({"engine": "batched", "walkers": [{}, {"ensemble": "pimd"}]})


def test_alflow_md_engine_batched(tmp_path, committee, monkeypatch):
    """``alflow md --engine batched`` runs the configured walkers through the batched engine."""
    import potentials
    import yaml

    from alflow.cli import main

    potentials.save(committee, tmp_path / "committee.pt")
    config = {"name": "t", "run_dir": str(tmp_path / "run"),
              "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}},
              "potential": {"architecture": "schnet", "cutoff": 4.0},
              "exploration": {"engine": "ase", "walkers": [
                  {"ensemble": "nvt-langevin", "temperature": [300, 500], "steps": 6, "stride": 3, "replicas": 2},
                  {"ensemble": "npt-iso", "temperature": 300, "pressure": 0.0, "steps": 6, "stride": 3}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    from alflow.explore import batched

    calls = []
    monkeypatch.setattr(batched, "run_batched", lambda *a, **k: calls.append(k) or run_batched(*a, **k))
    code = main(["md", str(tmp_path / "c.yaml"), "--model", str(tmp_path / "committee.pt"), "--engine", "batched",
                 "--out", str(tmp_path / "md"), "--device", "cpu", "--no-progress"])
    assert code == 0
    frames = read(tmp_path / "md" / "w01r00-npt-iso.extxyz", ":")
    assert [f.info[keys.STEP] for f in frames] == [0, 3, 6]
    assert len(calls) == 1 and calls[0]["min_distance"] == 0.5  # the batched engine ran, with the config's rules
    assert len(__import__("json").loads((tmp_path / "md" / "walkers.json").read_text())) == 3


@pytest.mark.gpu
def test_batched_engine_on_cuda_equals_cpu(tmp_path, committee):
    """The same walkers on CUDA and on the CPU (float64): the same statuses and positions (1e-6 Å after 20 steps)."""
    atoms = cu(2, rattle=0.02)
    specs = [WalkerSpec(atoms=atoms, ensemble=e, temperature=[300.0, 500.0], steps=20, stride=10, seed=k,
                        pressure=0.0 if e.startswith("npt") else None, name=f"w{k}")
             for k, e in enumerate(["nve", "nvt-langevin", "nvt-nose-hoover", "nvt-svr", "npt-iso", "npt-aniso"])]
    cpu = run_batched(specs, committee, tmp_path / "cpu", upper=10.0, progress=False, device="cpu")
    gpu = run_batched(specs, committee, tmp_path / "gpu", upper=10.0, progress=False, device="cuda")
    committee.cpu()
    for a, b in zip(cpu, gpu):
        assert a.status == b.status == DONE, (a.message, b.message)
        for x, y in zip(read(a.trajectory, ":"), read(b.trajectory, ":")):
            np.testing.assert_allclose(x.positions, y.positions, atol=1e-6)
            np.testing.assert_allclose(x.cell.array, y.cell.array, atol=1e-6)


@pytest.mark.slow
def test_batched_engine_runs_a_mace_committee(tmp_path):
    """Any Potential works: a MACE committee (NVT and NPT walkers in one batch, stress included)."""
    mace = Committee.build("mace", 2, species=["Cu"], cutoff=4.0, seed=0)
    for member in mace.members:
        member.scale.fill_(0.05)
    specs = [WalkerSpec(atoms=cu(2), ensemble=e, steps=4, stride=2, seed=k, pressure=0.0 if e.startswith("npt") else None,
                        name=f"w{k}") for k, e in enumerate(["nvt-langevin", "npt-iso"])]
    results = run_batched(specs, mace, tmp_path, upper=10.0, progress=False, device="cpu")
    assert [(r.status, r.steps, r.frames) for r in results] == [(DONE, 4, 3)] * 2, [r.message for r in results]
    first, last = read(results[1].trajectory, "0"), read(results[1].trajectory, "-1")
    assert not np.allclose(first.cell.array, last.cell.array, rtol=0, atol=1e-6)  # the barostat moved the cell
