"""MACE adapter: agreement with mace-torch's own forward, checkpoints, mace_run_train models.

Reference data: ASE's EMT on rattled, strained fcc Cu (and Cu/Au) cells.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials import e3nn_compat
from potentials.base import UnknownElementError
from potentials.mace import MACEPotential, mace_hparams

# e3nn 0.4.4 builds and copies its modules with TorchScript, deprecated in torch 2.13: noise, not failures
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The TorchScript type system:UserWarning"),
]
REPO = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_irreps="8x0e + 8x1o", max_ell=2, correlation=2, num_interactions=2,
             num_radial_basis=4, radial_MLP=[16], MLP_irreps="4x0e")
CUTOFF = 4.0
mace_data = e3nn_compat.import_mace("mace.data")
mace_tools = e3nn_compat.import_mace("mace.tools")
mace_geometric = e3nn_compat.import_mace("mace.tools.torch_geometric")
mace_modules = e3nn_compat.import_mace("mace.modules")
o3 = e3nn_compat.prepare_e3nn()


def cu_au_cell(seed: int, reps: tuple[int, int, int] = (2, 2, 1)) -> Atoms:
    """A rattled, sheared fcc Cu cell with every third atom Au."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(reps)
    atoms.numbers[::3] = 79
    strain = np.eye(3) + np.array([[0.01, 0.02, 0.0], [0.02, -0.01, 0.01], [0.0, 0.01, 0.005]])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
    return atoms


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the small models here are slower with two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MACEPotential:
    torch.manual_seed(0)
    m = potentials.build("mace", species=["Cu", "Au"], cutoff=CUTOFF, **SMALL).double().eval()
    with torch.no_grad():  # non-trivial E0, scale and shift, as a trained model has
        m.e0.copy_(torch.tensor([-3.1, -4.2]))
        m.scale.fill_(0.7)
        m.shift.fill_(0.05)
    return m


def mace_forward(module: torch.nn.Module, frames: list[Atoms], dtype: torch.dtype = torch.float64) -> dict:
    """mace-torch's own pipeline: its neighbour list, collation and forward with forces and stress."""
    z_table = mace_tools.AtomicNumberTable([int(z) for z in module.atomic_numbers])
    with mace_tools.torch_tools.default_dtype(dtype):
        graphs = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a), z_table=z_table,
                                                   cutoff=float(module.r_max), heads=["Default"]) for a in frames]
    loader = mace_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)
    data = next(iter(loader)).to_dict()
    return module(data, compute_force=True, compute_stress=True)


# ---------------------------------------------------------------------------- environment


def test_e3nn_import_is_fixed_in_code_and_mace_leaves_no_environment_change() -> None:
    """Fresh interpreter, no environment variables: e3nn fails alone, works after prepare_e3nn;
    importing the adapter leaves TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unset."""
    script = (
        "import os, torch\n"
        "try:\n"
        "    import e3nn.o3\n"
        "    print('E3NN_ALONE_OK')\n"
        "except Exception as exc:\n"
        "    print('E3NN_ALONE_FAILS', type(exc).__name__)\n"
        "import potentials.e3nn_compat as c\n"
        "c.prepare_e3nn()\n"
        "import e3nn.o3\n"
        "import potentials.mace\n"
        "print('ENV', os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FORCE")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) >= (2, 6):  # the pitfall exists only with the weights-only default of torch >= 2.6
        assert "E3NN_ALONE_FAILS" in run.stdout
    assert "ENV None" in run.stdout, run.stdout


# ---------------------------------------------------------------------------- against mace-torch


def test_energy_forces_stress_equal_mace_own_forward(model: MACEPotential) -> None:
    frames = [cu_au_cell(1), cu_au_cell(2, reps=(1, 1, 2))]  # two structures of different sizes
    out = model(atoms_to_batch(frames, CUTOFF, dtype=torch.float64), forces=True, stress=True)
    ref = mace_forward(model.to_mace_model(), frames)
    for key in (keys.ENERGY, keys.NODE_ENERGY, keys.FORCES, keys.STRESS):
        assert torch.isfinite(out[key]).all(), key
    assert float(out[keys.FORCES].abs().max()) > 1e-3  # a real test: non-trivial forces
    assert float(out[keys.STRESS].abs().max()) > 1e-5
    torch.testing.assert_close(out[keys.ENERGY], ref["energy"].detach(), rtol=0, atol=1e-8)
    torch.testing.assert_close(out[keys.NODE_ENERGY], ref["node_energy"].detach(), rtol=0, atol=1e-8)
    torch.testing.assert_close(out[keys.FORCES], ref["forces"].detach(), rtol=0, atol=1e-8)
    # both ASE's convention: sigma = (1/V) dE/d(strain); MACE returns (B, 3, 3)
    torch.testing.assert_close(out[keys.STRESS], ref["stress"].detach(), rtol=0, atol=1e-8)


def test_mace_sees_alflow_vectors_exactly(model: MACEPotential) -> None:
    """sender = edge_index[0] = i, receiver = edge_index[1] = j: MACE's vectors are alflow's D, bit for bit."""
    from alflow.neighbors import edge_vectors
    mace_utils = e3nn_compat.import_mace("mace.modules.utils")

    batch = atoms_to_batch([cu_au_cell(3), cu_au_cell(4)], CUTOFF, dtype=torch.float64)
    species = model.species_index(batch[keys.NUMBERS])
    data = model.mace_input(batch, species)
    vectors, _ = mace_utils.get_edge_vectors_and_lengths(data["positions"], data["edge_index"], data["shifts"])
    ei = batch[keys.EDGE_INDEX]
    expected = edge_vectors(
        batch[keys.POSITIONS], batch[keys.CELL], ei[0], ei[1], batch[keys.SHIFTS], batch[keys.BATCH]
    )
    assert torch.equal(vectors, expected)
    assert not batch[keys.POSITIONS].requires_grad  # the caller's tensor is left alone


def test_stress_sign_is_ase_convention(model: MACEPotential) -> None:
    """sigma_ab = (1/V) dE/d eps_ab by central differences of a symmetric strain."""
    atoms = cu_au_cell(5)
    stress = model(atoms_to_batch(atoms, CUTOFF, dtype=torch.float64), stress=True)[keys.STRESS][0]
    h = 1e-5
    for a, b in [(0, 0), (0, 1), (1, 2)]:
        energies = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[a, b] += sign * h / (1 if a == b else 2)
            eps[b, a] += 0 if a == b else sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ eps, scale_atoms=True)
            out = model(atoms_to_batch(strained, CUTOFF, dtype=torch.float64), forces=False)
            energies.append(out[keys.ENERGY].item())
        numeric = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
        assert abs(float(stress[a, b]) - numeric) < 1e-7, (a, b)


def test_float32_matches_float64(model: MACEPotential) -> None:
    batch64 = atoms_to_batch(cu_au_cell(6), CUTOFF, dtype=torch.float64)
    batch32 = atoms_to_batch(cu_au_cell(6), CUTOFF, dtype=torch.float32)
    single = copy.deepcopy(model).float()
    out32 = single(batch32, stress=True)
    out64 = model(batch64, stress=True)
    assert out32[keys.ENERGY].dtype == out32[keys.FORCES].dtype == out32[keys.NODE_ENERGY].dtype == torch.float32
    torch.testing.assert_close(out32[keys.ENERGY].double(), out64[keys.ENERGY], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out32[keys.FORCES].double(), out64[keys.FORCES], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- contract pieces


def test_save_load_round_trip_is_weights_only(model: MACEPotential, tmp_path: Path) -> None:
    path = potentials.save(model, tmp_path / "mace.pt")
    payload = torch.load(path, weights_only=True)  # data only, no pickled code
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    loaded = potentials.load(path, device="cpu")
    assert isinstance(loaded, MACEPotential) and loaded.hparams == model.hparams
    batch = atoms_to_batch(cu_au_cell(7), CUTOFF, dtype=torch.float64)
    a, b = model(batch, stress=True), loaded(batch, stress=True)
    for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12)


def test_unknown_element_and_bad_hparams_are_named(model: MACEPotential) -> None:
    atoms = cu_au_cell(8)
    atoms.numbers[0] = 47
    with pytest.raises(UnknownElementError, match=r"Ag \(Z=47\)"):
        model(atoms_to_batch(atoms, CUTOFF, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate"):
        MACEPotential(["Cu"], 4.0, gate="relu")
    with pytest.raises(ValueError, match="atomic_numbers"):
        MACEPotential(["Cu"], 4.0, atomic_numbers=[29, 79])
    with pytest.raises(ValueError, match="hidden_irrep"):
        potentials.build("mace", ["Cu"], 4.0, hidden_irrep="8x0e")


def test_trains_through_the_generic_path(model: MACEPotential) -> None:
    """Forces-loss gradients reach MACE's weights (create_graph in train mode); one Adam step lowers the loss."""
    trainee = copy.deepcopy(model).train()
    frames = []
    for seed in (10, 11):
        atoms = cu_au_cell(seed)
        atoms.calc = EMT()
        atoms.info[keys.REF_ENERGY] = atoms.get_potential_energy()
        atoms.arrays[keys.REF_FORCES] = atoms.get_forces()
        frames.append(atoms)
    batch = atoms_to_batch(frames, CUTOFF, dtype=torch.float64, labels=True)
    groups = trainee.parameter_groups(weight_decay=5e-7)
    assert sum(len(g["params"]) for g in groups) == len(list(trainee.parameters()))  # every weight, once
    optimizer = torch.optim.Adam(groups, lr=1e-2, amsgrad=True)

    def loss_fn() -> torch.Tensor:
        out = trainee(batch)
        return ((out[keys.FORCES] - batch[keys.REF_FORCES]) ** 2).mean()

    before = loss_fn()
    optimizer.zero_grad()
    before.backward()
    grads = [p.grad for p in trainee.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.8 * len(grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    optimizer.step()
    assert float(loss_fn()) < float(before)


# ---------------------------------------------------------------------------- wrapping mace-torch modules


def _mace_module(model_class: str, atomic_numbers: list[int]) -> torch.nn.Module:
    """A mace-torch module built directly, with E0s, scale and shift inside (as mace_run_train makes)."""
    torch.manual_seed(1)
    kwargs = dict(
        r_max=CUTOFF, num_bessel=4, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=mace_modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=mace_modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=2, num_elements=len(atomic_numbers), hidden_irreps=o3.Irreps("8x0e + 8x1o"),
        MLP_irreps=o3.Irreps("4x0e"),
        atomic_energies=np.array([-3.5, -4.25][: len(atomic_numbers)]), avg_num_neighbors=17.0,
        atomic_numbers=atomic_numbers, correlation=[2, 1], gate=torch.nn.functional.silu, radial_MLP=[16, 16],
    )
    if model_class == "ScaleShiftMACE":
        module = mace_modules.ScaleShiftMACE(atomic_inter_scale=0.6, atomic_inter_shift=-0.02, **kwargs)
    else:
        module = mace_modules.MACE(**kwargs)
    return module.double()


@pytest.mark.parametrize("model_class, order", [("ScaleShiftMACE", [79, 29]), ("MACE", [29, 79])])
def test_from_mace_module_round_trip(model_class: str, order: list[int], tmp_path: Path) -> None:
    module = _mace_module(model_class, order)
    wrapped = MACEPotential.from_mace_model(module)
    assert wrapped.hparams["model_class"] == model_class and wrapped.hparams["correlation"] == [2, 1]
    assert wrapped.hparams["interaction_first"] == "RealAgnosticInteractionBlock"
    frames = [cu_au_cell(12)]
    ref = mace_forward(module, frames)
    loaded = potentials.load(potentials.save(wrapped, tmp_path / "wrapped.pt"), device="cpu")
    for candidate in (wrapped, loaded):
        out = candidate(atoms_to_batch(frames, CUTOFF, dtype=torch.float64), stress=True)
        torch.testing.assert_close(out[keys.ENERGY], ref["energy"].detach(), rtol=0, atol=1e-8)
        torch.testing.assert_close(out[keys.FORCES], ref["forces"].detach(), rtol=0, atol=1e-8)
        torch.testing.assert_close(out[keys.STRESS], ref["stress"].detach(), rtol=0, atol=1e-8)
    exported = wrapped.to_mace_model()  # and back out: mace's own module with E0/scale/shift inside
    torch.testing.assert_close(mace_forward(exported, frames)["energy"], ref["energy"], rtol=0, atol=1e-8)


def test_from_mace_model_file_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "untrusted.model"
    path.write_bytes(b"never unpickled")
    with pytest.raises(PermissionError, match="trusted=True"):
        MACEPotential.from_mace_model(path)
    with pytest.raises(ValueError, match="multi-head"):
        module = _mace_module("ScaleShiftMACE", [29, 79])
        module.heads = ["pt_head", "Default"]
        mace_hparams(module)


# ---------------------------------------------------------------------------- mace_run_train


def emt_frames(n: int, seed: int = 0) -> list[Atoms]:
    """Rattled, strained 8-atom fcc Cu cells labelled by EMT (REF_energy, REF_forces, REF_stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 2, 2))
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info[keys.REF_ENERGY] = atoms.get_potential_energy()
        atoms.arrays[keys.REF_FORCES] = atoms.get_forces()
        atoms.info[keys.REF_STRESS] = atoms.get_stress()
        atoms.calc = None
        frames.append(atoms)
    return frames


@pytest.mark.slow
def test_mace_run_train_model_through_alflow(tmp_path: Path) -> None:
    """A real mace_run_train run (2 epochs, tiny model, CPU) → wrap → weights-only checkpoint →
    energies, forces and stress equal MACECalculator's on a periodic Cu cell."""
    write(tmp_path / "train.xyz", emt_frames(30), format="extxyz")
    runner = "import potentials.e3nn_compat as c; c.prepare_e3nn(); from mace.cli.run_train import main; main()"
    argv = [
        "--name", "cu", "--train_file", "train.xyz", "--valid_fraction", "0.1", "--E0s", "average",
        "--energy_key", keys.REF_ENERGY, "--forces_key", keys.REF_FORCES, "--stress_key", keys.REF_STRESS,
        "--model", "MACE", "--hidden_irreps", "8x0e + 8x1o", "--r_max", "4.5", "--max_ell", "2",
        "--correlation", "2", "--num_interactions", "2", "--num_radial_basis", "4", "--radial_MLP", "[16]",
        "--MLP_irreps", "4x0e", "--batch_size", "10", "--max_num_epochs", "2", "--device", "cpu",
        "--default_dtype", "float64", "--seed", "1", "--plot", "False", "--num_workers", "0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FORCE")}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", runner, *argv], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    print(f"mace_run_train: {time.perf_counter() - start:.1f} s")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    model_file = tmp_path / "cu.model"
    assert model_file.is_file()

    wrapped = MACEPotential.from_mace_model(model_file, trusted=True)
    assert wrapped.species == [29] and wrapped.cutoff == 4.5
    assert float(wrapped.e0[0]) != 0.0 and float(wrapped.scale) != 1.0  # moved out of MACE's module
    checkpoint = potentials.save(wrapped, tmp_path / "wrapped.pt")
    loaded = potentials.load(checkpoint, device="cpu")  # torch.load(weights_only=True): no pickle

    atoms = bulk("Cu", "fcc", a=3.63, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=3)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + [[0.01, 0.004, 0], [0.004, -0.01, 0], [0, 0, 0.005]]),
                   scale_atoms=True)
    calculators = e3nn_compat.import_mace("mace.calculators")
    original = torch.load(model_file, map_location="cpu", weights_only=False)  # trusted: we just trained it
    atoms.calc = calculators.MACECalculator(models=[original], device="cpu", default_dtype="float64")
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    for candidate in (wrapped, loaded):
        out = candidate(atoms_to_batch(atoms, candidate.cutoff, dtype=torch.float64), stress=True)
        assert abs(out[keys.ENERGY].item() - energy) <= 1e-6 * abs(energy)
        np.testing.assert_allclose(out[keys.FORCES].detach().numpy(), forces,
                                   rtol=1e-6, atol=1e-6 * np.abs(forces).max())
        np.testing.assert_allclose(out[keys.STRESS][0].detach().numpy(), stress,
                                   rtol=1e-6, atol=1e-6 * np.abs(stress).max())


# ---------------------------------------------------------------------------- committees


def test_vmapped_committee_equals_member_loop() -> None:
    """A MACE committee takes the vmapped path (no fallback warning) and equals the member loop (float64)."""
    import warnings

    from potentials.committee import Committee

    committee = Committee.build("mace", 3, species=["Cu", "Au"], cutoff=CUTOFF, seed=3, **SMALL).double().eval()
    for k, member in enumerate(committee.members):  # members differ in their buffers too
        member.scale.fill_(0.7 + 0.1 * k)
        member.shift.fill_(0.01 * k)
    batch = atoms_to_batch([cu_au_cell(11), cu_au_cell(12, reps=(1, 1, 2))], CUTOFF, dtype=torch.float64)
    committee.vectorize = False
    loop = committee(batch, forces=True, stress=True)
    committee.vectorize = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a vmap fallback warns: fail instead
        vmapped = committee(batch, forces=True, stress=True)
    assert committee.vectorized
    assert float(loop[keys.FORCES_VAR].max()) > 1e-10  # the members genuinely differ
    for key in (keys.ENERGIES, keys.FORCES_COMM, keys.STRESS_COMM, keys.MAX_FORCE_DEVIATION):
        torch.testing.assert_close(vmapped[key], loop[key], rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_cuequivariance_gives_the_same_numbers() -> None:
    """On CUDA with cuequivariance-torch: the cuEq copy of a committee equals the e3nn one."""
    from potentials.committee import Committee
    from potentials.mace import cueq_unavailable, with_cueq

    reason = cueq_unavailable("cuda")
    if reason is not None:
        pytest.skip(reason)
    committee = Committee.build("mace", 2, species=["Cu", "Au"], cutoff=CUTOFF, seed=4, **SMALL).double().eval().cuda()
    batch = {k: v.cuda() for k, v in atoms_to_batch([cu_au_cell(13)], CUTOFF, dtype=torch.float64).items()}
    reference = committee(batch, forces=True, stress=True)
    fast = with_cueq(committee, "cuda")(batch, forces=True, stress=True)
    assert all(getattr(m, "cueq", False) for m in with_cueq(committee, "cuda").members)
    for key in (keys.ENERGIES, keys.FORCES_COMM, keys.STRESS_COMM):
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-6, atol=1e-6)
