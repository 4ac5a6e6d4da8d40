"""The architecture registry and weights-only checkpoints (potentials.registry)."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials import UnknownElementError
from potentials.registry import CheckpointError


def outputs(model: potentials.Potential, atoms) -> dict[str, torch.Tensor]:
    batch = atoms_to_batch(atoms, model.cutoff, dtype=model.e0.dtype)
    return {k: v.detach() for k, v in model(batch, forces=True, stress=True).items()}


def test_available_lists_schnet_and_painn():
    names = potentials.available()
    assert {"schnet", "painn"} <= set(names)
    assert names == sorted(names)


def test_unknown_architecture_lists_available():
    with pytest.raises(ValueError, match="unknown name 'nequipp'") as info:
        potentials.build("nequipp", species=["Cu"], cutoff=5.0)
    for name in ("schnet", "painn"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("schnet", ["n_atom_basis", "n_filters", "n_interactions", "n_rbf"]),
        ("painn", ["n_atom_basis", "n_interactions", "n_rbf", "shared_filters"]),
    ],
)
def test_unknown_hparam_lists_allowed(name, allowed):
    with pytest.raises(ValueError, match="n_layers") as info:
        potentials.build(name, species=["Cu"], cutoff=5.0, n_layers=3)
    for hparam in allowed:
        assert hparam in str(info.value)
    assert potentials.get_class(name).hparam_names() == allowed


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_hparams_are_recorded_and_rebuild(name):
    model = potentials.build(name, species=["Ni", 29], cutoff=4.5, n_atom_basis=8, n_interactions=1, n_rbf=4)
    assert model.species == [28, 29] and model.cutoff == 4.5 and model.architecture == name
    assert model.hparams["n_atom_basis"] == 8 and model.hparams["n_interactions"] == 1
    rebuilt = potentials.build(name, species=model.species, cutoff=model.cutoff, **model.hparams)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_save_load_round_trip(make_model, tmp_path, cu_ni):
    model = make_model(seed=3)
    with torch.no_grad():
        model.e0.copy_(torch.arange(1.0, len(model.species) + 1, dtype=torch.float64) * -0.5)
        model.shift.fill_(0.1)
        model.scale.fill_(1.7)
    path = potentials.save(model, tmp_path / "sub" / "model.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))

    payload = torch.load(path, map_location="cpu", weights_only=True)  # data only, no pickled code
    assert payload["kind"] == "potential" and isinstance(payload["metadata"], str)

    loaded = potentials.load(path, device="cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.hparams == model.hparams
    assert loaded.species == model.species and loaded.cutoff == model.cutoff
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.e0.dtype == torch.float64
    ref, got = outputs(model, cu_ni), outputs(loaded, cu_ni)
    for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


def test_float32_model_stays_float32(tmp_path):
    model = potentials.build("schnet", species=["Cu"], cutoff=4.0, n_atom_basis=8, n_filters=8, n_interactions=1)
    loaded = potentials.load(potentials.save(model, tmp_path / "m.pt"), device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_unknown_element_is_named(name):
    model = potentials.build(name, species=["Cu", "Ni"], cutoff=4.0, n_interactions=1).double()
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[2] = 26
    with pytest.raises(UnknownElementError, match=r"\bFe\b"):
        outputs(model, atoms)


def test_corrupt_file_is_a_checkpoint_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file\x00\x01")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        potentials.load(garbage, device="cpu")


def test_foreign_torch_file_is_a_checkpoint_error(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*not an alflow checkpoint"):
        potentials.load(foreign, device="cpu")


def test_pickled_module_is_refused(tmp_path):
    """A whole pickled module (code, not data) is refused by weights_only loading."""
    pickled = tmp_path / "pickled.pt"
    torch.save(potentials.build("schnet", species=["Cu"], cutoff=4.0, n_interactions=1), pickled)
    with pytest.raises(CheckpointError, match="pickled.pt"):
        potentials.load(pickled, device="cpu")


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        potentials.load(tmp_path / "missing.pt", device="cpu")



def test_docs_list_every_architecture():
    """docs/potentials.md has a table row for every registered architecture (and none that is gone)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "potentials.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE))
    assert rows == set(potentials.available())
