"""The ASE calculator (alflow.calculator): model forces, numerical stress, ASE dynamics and optimizers.

Small, randomly initialised SchNet models (float64) on real periodic Cu cells.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from ase.stress import full_3x3_to_voigt_6_stress

from alflow import keys
from alflow.calculator import ENERGIES_COMM, AlflowCalculator, resolve_device
from alflow.graph import atoms_to_batch
from potentials import registry
from potentials.base import UnknownElementError
from potentials.committee import Committee

HPARAMS = {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 10}
CUTOFF = 4.5


def small_schnet(seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    model = registry.build("schnet", ["Cu"], CUTOFF, **HPARAMS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases start at zero: make the model depend on geometry strongly
        model.scale.fill_(0.5)
        model.e0.fill_(-3.5)
    return model.to(dtype).eval()


def rattled_cu(repeat=(2, 2, 2), seed: int = 0, shear: bool = True) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    if shear:
        cell = atoms.cell.array.copy()
        cell[0] += 0.1 * cell[1]
        atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def model_outputs(model, atoms) -> dict[str, np.ndarray]:
    batch = atoms_to_batch(atoms, model.cutoff, dtype=torch.float64)
    return {k: v.detach().numpy() for k, v in model(batch, forces=True, stress=True).items()}


def test_energy_and_forces_are_the_models():
    model = small_schnet()
    atoms = rattled_cu()
    atoms.calc = AlflowCalculator(model)
    ref = model_outputs(model, atoms)
    assert atoms.get_potential_energy() == pytest.approx(float(ref[keys.ENERGY][0]), abs=1e-12)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
    np.testing.assert_allclose(atoms.get_forces(), ref[keys.FORCES], rtol=0, atol=1e-12)
    assert np.abs(atoms.get_forces()).max() > 1e-2  # a non-trivial model


def test_stress_equals_numerical_stress():
    """Analytic (autograd) stress = ASE's central-difference stress, to 1e-6 eV/Å³ in float64."""
    atoms = rattled_cu(repeat=(1, 1, 2))
    calc = AlflowCalculator(small_schnet())
    atoms.calc = calc
    stress = atoms.get_stress()
    assert stress.shape == (6,)
    numerical = calculate_numerical_stress(atoms, eps=1e-5, voigt=True)
    np.testing.assert_allclose(stress, numerical, rtol=0, atol=1e-6)
    assert np.abs(stress).max() > 1e-3
    np.testing.assert_allclose(stress, full_3x3_to_voigt_6_stress(model_outputs(calc.model, atoms)[keys.STRESS][0]))


def test_velocity_verlet_conserves_energy_and_tracks_positions():
    atoms = rattled_cu(repeat=(2, 2, 2), shear=False)
    atoms.calc = AlflowCalculator(small_schnet())
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    e_start = atoms.get_total_energy()
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(8)
    assert abs(atoms.get_total_energy() - e_start) < 1e-3 * len(atoms)
    # the cached results belong to the final positions, not to a stale step
    np.testing.assert_allclose(atoms.get_forces(), model_outputs(atoms.calc.model, atoms)[keys.FORCES], atol=1e-12)


def test_bfgs_lowers_energy():
    atoms = rattled_cu(repeat=(2, 2, 1), seed=3)
    atoms.calc = AlflowCalculator(small_schnet())
    e0 = atoms.get_potential_energy()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=1e-4, steps=6)
    assert opt.nsteps == 6
    assert atoms.get_potential_energy() < e0 - 1e-3


def test_cell_filter_uses_the_stress():
    atoms = rattled_cu(repeat=(1, 1, 2), seed=4)
    atoms.calc = AlflowCalculator(small_schnet())
    filtered = FrechetCellFilter(atoms)
    virial = filtered.get_forces()[len(atoms):]
    np.testing.assert_allclose(
        virial, -atoms.get_volume() * model_outputs(atoms.calc.model, atoms)[keys.STRESS][0] / filtered.exp_cell_factor,
        atol=1e-10,
    )
    cell0, e0 = atoms.cell.array.copy(), atoms.get_potential_energy()
    BFGS(filtered, logfile=None).run(fmax=1e-4, steps=3)
    assert np.abs(atoms.cell.array - cell0).max() > 1e-4
    assert atoms.get_potential_energy() < e0


def test_committee_results_and_path_loading(tmp_path):
    members = [small_schnet(seed=s) for s in range(3)]
    committee = Committee(members)
    committee.set_alpha(1.5)
    path = registry.save(committee, tmp_path / "committee.pt")
    atoms = rattled_cu(repeat=(1, 1, 2))
    for model in (committee, path):
        calc = AlflowCalculator(model, device="cpu")
        atoms.calc = calc
        stress, forces, energy = atoms.get_stress(), atoms.get_forces(), atoms.get_potential_energy()
        r = calc.results
        n = len(atoms)
        assert r[ENERGIES_COMM].shape == (3,) and r[keys.FORCES_COMM].shape == (3, n, 3)
        assert r["energies"].shape == (n,)  # ASE's per-atom energies (the members' mean), summing to the energy
        assert r["energies"].sum() == pytest.approx(r["energy"], abs=1e-10)
        np.testing.assert_allclose(atoms.get_potential_energies(), r["energies"])
        assert r[keys.STRESS_COMM].shape == (3, 6) and r[keys.FORCES_VAR].shape == (n, 3)
        assert energy == pytest.approx(r[ENERGIES_COMM].mean(), abs=1e-12)
        np.testing.assert_allclose(forces, r[keys.FORCES_COMM].mean(0), atol=1e-12)
        np.testing.assert_allclose(stress, r[keys.STRESS_COMM].mean(0), atol=1e-12)
        for k, member in enumerate(members):  # each member's predictions, as the member alone
            np.testing.assert_allclose(r[keys.FORCES_COMM][k], model_outputs(member, atoms)[keys.FORCES], atol=1e-10)
        eps = 1.5 * np.sqrt(((r[keys.FORCES_COMM] - forces) ** 2).sum(-1).mean(0))
        assert r[keys.MAX_FORCE_DEVIATION] == pytest.approx(eps.max(), rel=1e-10)
        assert r[keys.ENERGY_VAR] == pytest.approx(1.5**2 * r[ENERGIES_COMM].var(), rel=1e-10)
        assert r[keys.ENERGY_DEVIATION_PER_ATOM] == pytest.approx(1.5 * r[ENERGIES_COMM].std() / n, rel=1e-10)
        assert isinstance(r[keys.MAX_FORCE_DEVIATION], float) and r[keys.MAX_FORCE_DEVIATION] > 0


def test_frames_with_a_committee_calculator_attached_write_to_extxyz(tmp_path):
    atoms = rattled_cu(repeat=(1, 1, 2))
    atoms.calc = AlflowCalculator(Committee([small_schnet(seed=s) for s in range(3)]), device="cpu")
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    write(tmp_path / "frame.extxyz", atoms)  # calc.results go into the file; member energies must not clash
    back = read(tmp_path / "frame.extxyz")
    assert back.get_potential_energy() == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(back.get_forces(), forces, atol=1e-6)
    np.testing.assert_allclose(back.get_potential_energies(), atoms.calc.results["energies"], atol=1e-6)


def test_unknown_element_is_named():
    atoms = rattled_cu(repeat=(1, 1, 1))
    atoms.numbers[1] = 46
    atoms.calc = AlflowCalculator(small_schnet())
    with pytest.raises(UnknownElementError, match=r"Pd \(Z=46\)"):
        atoms.get_potential_energy()


def test_stress_needs_a_3d_periodic_cell():
    cluster = bulk("Cu", "fcc", a=3.61, cubic=True)
    cluster.pbc = False
    cluster.center(vacuum=5.0)
    cluster.calc = AlflowCalculator(small_schnet())
    assert np.isfinite(cluster.get_potential_energy()) and cluster.get_forces().shape == (4, 3)
    np.testing.assert_allclose(cluster.get_forces().sum(0), 0.0, atol=1e-10)  # no periodic images: momentum conserved
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        cluster.get_stress()


def test_dtype_and_device_follow_the_model():
    calc = AlflowCalculator(small_schnet(dtype=torch.float32))
    assert calc.dtype == torch.float32 and calc.device == resolve_device("auto")
    atoms = rattled_cu(repeat=(1, 1, 1))
    atoms.calc = calc
    assert atoms.get_forces().dtype == np.float64
    ref = model_outputs(small_schnet(dtype=torch.float64), atoms)
    np.testing.assert_allclose(atoms.get_forces(), ref[keys.FORCES], atol=1e-4)
    with pytest.raises(TypeError, match="model"):
        AlflowCalculator(object())


@pytest.mark.gpu
def test_cuda_calculator_matches_cpu():
    model = small_schnet()
    atoms = rattled_cu()
    atoms.calc = AlflowCalculator(model, device="cpu")
    cpu = atoms.get_forces().copy()
    atoms.calc = AlflowCalculator(small_schnet(), device="cuda")
    np.testing.assert_allclose(atoms.get_forces(), cpu, atol=1e-10)
