"""Committee scores and calibration (alflow.committee): definitions, ddof, α recovery, calibration on EMT labels."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from alflow import committee as cm
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.committee import Committee


def brute_force(forces_comm, energies, n_atoms, alpha):
    """The definitions written as plain loops."""
    k_members, n = len(forces_comm), len(forces_comm[0])
    mean_f = [[sum(forces_comm[k][i][a] for k in range(k_members)) / k_members for a in range(3)] for i in range(n)]
    eps = []
    var = []
    for i in range(n):
        sq = 0.0
        row = []
        for a in range(3):
            v = sum((forces_comm[k][i][a] - mean_f[i][a]) ** 2 for k in range(k_members)) / k_members
            row.append(alpha**2 * v)
            sq += v
        var.append(row)
        eps.append(alpha * math.sqrt(sq))
    mean_e = sum(energies) / k_members
    e_var = alpha**2 * sum((e - mean_e) ** 2 for e in energies) / k_members
    return {
        keys.ENERGY: mean_e,
        keys.FORCES: np.array(mean_f),
        keys.FORCES_VAR: np.array(var),
        "force_deviation": np.array(eps),
        keys.MAX_FORCE_DEVIATION: max(eps),
        keys.ENERGY_VAR: e_var,
        keys.ENERGY_DEVIATION_PER_ATOM: math.sqrt(e_var) / n_atoms,
    }


@pytest.mark.parametrize(("k", "n", "alpha"), [(2, 1, 1.0), (4, 7, 1.0), (5, 12, 2.3), (1, 3, 1.0)])
def test_scores_equal_brute_force(k, n, alpha):
    rng = np.random.default_rng(k * 100 + n)
    forces = rng.normal(size=(k, n, 3))
    energies = rng.normal(size=k) * 3.0
    got = cm.scores(forces, energies, n, alpha=alpha)
    want = brute_force(forces.tolist(), energies.tolist(), n, alpha)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-15, err_msg=key)
    assert cm.max_force_deviation(forces, alpha) == pytest.approx(want[keys.MAX_FORCE_DEVIATION], rel=1e-12)
    assert cm.energy_deviation_per_atom(energies, n, alpha) == pytest.approx(want[keys.ENERGY_DEVIATION_PER_ATOM])
    if k == 1:
        assert got[keys.MAX_FORCE_DEVIATION] == 0.0 and got[keys.ENERGY_VAR] == 0.0


def test_dp_gen_definitions_hand_computed():
    """K = 2 members, F = ±(3, 0, 4) eV/Å on atom 0, equal on atom 1; E = 1 and 3 eV, N = 2.

    Population std (ddof 0): eps_0 = sqrt(mean(25, 25)) = 5, not sqrt(2)·5 (ddof 1) nor 5/sqrt(3) (mean over xyz);
    energy deviation per atom = std(1, 3)/2 = 1/2.
    """
    forces = np.array([[[3.0, 0.0, 4.0], [1.0, 1.0, 1.0]], [[-3.0, 0.0, -4.0], [1.0, 1.0, 1.0]]])
    s = cm.scores(forces, [1.0, 3.0], n_atoms=2)
    np.testing.assert_allclose(s["force_deviation"], [5.0, 0.0])
    assert s[keys.MAX_FORCE_DEVIATION] == 5.0
    assert s[keys.ENERGY_DEVIATION_PER_ATOM] == 0.5
    assert s[keys.ENERGY_VAR] == 1.0
    np.testing.assert_allclose(s[keys.FORCES_VAR][0], [9.0, 0.0, 16.0])
    # deepmd-kit's calc_model_devi_f / calc_model_devi_e written out
    assert s[keys.MAX_FORCE_DEVIATION] == np.max(np.linalg.norm(np.std(forces, axis=0), axis=-1))
    assert s[keys.ENERGY_DEVIATION_PER_ATOM] == np.std(np.array([1.0, 3.0]) / 2)


def test_scores_module_does_not_import_torch():
    code = "import sys, alflow.committee; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="forces_comm"):
        cm.scores(np.zeros((2, 3)), [0.0, 1.0])
    with pytest.raises(ValueError, match="energies"):
        cm.scores(np.zeros((2, 3, 3)), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        cm.force_deviation(np.zeros((2, 3, 3)), alpha=0.0)
    with pytest.raises(ValueError, match="predicted_std"):
        cm.fit_alpha([1.0, 0.0], [0.1, 0.1])
    with pytest.raises(ValueError, match="true_error"):
        cm.fit_alpha([1.0, 2.0], [0.1])
    with pytest.raises(ValueError, match="n_members"):
        cm.fit_alpha([1.0], [0.1], n_members=3)


@pytest.mark.parametrize("alpha", [0.4, 1.0, 3.0])
def test_fit_alpha_recovers_known_alpha(alpha):
    """Errors drawn with std α·σ around heteroscedastic σ: the ML estimate returns α (±2 %, n = 40,000)."""
    rng = np.random.default_rng(int(alpha * 10))
    sigma = rng.uniform(0.02, 0.5, size=40_000)
    err = rng.normal(size=sigma.size) * alpha * sigma
    assert cm.fit_alpha(sigma, err) == pytest.approx(alpha, rel=0.02)
    # scale-free: errors and σ in other units give the same α
    assert cm.fit_alpha(10 * sigma, 10 * err) == pytest.approx(cm.fit_alpha(sigma, err), rel=1e-12)


def test_small_committee_correction_recovers_alpha():
    """Members drawn from N(μ, s²), the truth from N(μ, α² s²): with K = 8 the Musil et al. correction
    recovers α from the committee's own (ddof 0) σ, while the plain estimate is biased upwards."""
    rng = np.random.default_rng(7)
    k, n, alpha = 8, 100_000, 1.5
    s = rng.uniform(0.05, 0.3, size=n)
    mu = rng.normal(size=n)
    members = mu + s * rng.normal(size=(k, n))
    truth = mu + alpha * s * rng.normal(size=n)
    sigma = members.std(axis=0, ddof=0)
    err = truth - members.mean(axis=0)
    corrected = cm.fit_alpha(sigma, err, n_members=k)
    # the corrected α multiplies the ddof-0 σ: α_u² = α² by construction, so α_ddof0 = α sqrt(K/(K-1))
    assert corrected == pytest.approx(alpha * math.sqrt(k / (k - 1)), rel=0.03)
    plain = cm.fit_alpha(sigma, err)
    assert plain > 1.1 * corrected


@pytest.fixture(scope="module")
def emt_frames():
    frames = []
    for seed in range(6):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.08, seed=seed)
        atoms.calc = EMT()
        atoms.info[keys.REF_ENERGY] = atoms.get_potential_energy()
        atoms.arrays[keys.REF_FORCES] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("target", ["forces", "energy", "both"])
def test_calibrate_committee_on_emt_frames(emt_frames, target):
    """After calibration the calibrated z-scores have unit mean square on the validation frames."""
    committee = Committee.build("schnet", 4, ["Cu"], 4.0, seed=0, n_atom_basis=8, n_filters=8, n_interactions=1)
    committee.double().eval()
    for m in committee.members:  # a crude fit of the energy scale, so errors and spreads are comparable
        m.e0.fill_(-0.0)
    alpha = cm.calibrate_committee(committee, emt_frames, target=target, batch_size=4)
    assert float(committee.alpha) == pytest.approx(alpha, rel=1e-12)
    batch = atoms_to_batch(emt_frames, 4.0, dtype=torch.float64, labels=True)
    out = {k: v.detach().numpy() for k, v in committee(batch).items()}
    z2 = []
    if target in ("forces", "both"):
        z2.append(((batch[keys.REF_FORCES].numpy() - out[keys.FORCES]) ** 2 / out[keys.FORCES_VAR]).ravel())
    if target in ("energy", "both"):
        z2.append((batch[keys.REF_ENERGY].numpy() - out[keys.ENERGY]) ** 2 / out[keys.ENERGY_VAR])
    assert np.concatenate(z2).mean() == pytest.approx(1.0, rel=1e-8)
    assert alpha != pytest.approx(1.0, rel=1e-3)  # the calibration did something
    with pytest.raises(ValueError, match="target"):
        cm.calibrate_committee(committee, emt_frames, target="stress")


def test_calibrate_if_enough_needs_enough_validation_frames(emt_frames):
    """Too few validation frames leave α = 1 with the reason; enough give calibrate_committee's α."""
    committee = Committee.build("schnet", 4, ["Cu"], 4.0, seed=0, n_atom_basis=8, n_filters=8, n_interactions=1)
    committee.double().eval()
    committee.set_alpha(3.0)  # a previous value must not survive a skipped calibration
    alpha, note = cm.calibrate_if_enough(committee, emt_frames[:2], min_frames=3)
    assert alpha == 1.0 and float(committee.alpha) == 1.0
    assert "2 validation frame(s)" in note and "calibration_min_frames = 3" in note
    alpha, note = cm.calibrate_if_enough(committee, emt_frames[:3], min_frames=3)
    assert note is None and alpha != pytest.approx(1.0, rel=1e-3)
    assert alpha == pytest.approx(cm.calibrate_committee(committee, emt_frames[:3]), rel=1e-12)
