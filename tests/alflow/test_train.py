"""Tests for training (alflow.train), metrics (alflow.metrics), the Cu/EMT generator and ``alflow train``.

Real parts only: a small SchNet on 32-atom Cu cells from Langevin MD labelled by ASE's EMT.
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

import potentials
from alflow.cli import main
from alflow.config import TrainingConfig
from alflow.data import fit_e0
from alflow.datasets import cu_emt_dataset
from alflow.io import write_extxyz_atomic
from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS
from alflow.metrics import evaluate
from alflow.train import TrainingDivergedError, train_committee, train_potential
from potentials.base import UnknownElementError
from potentials.committee import Committee

CUTOFF = 4.0
HPARAMS = dict(n_atom_basis=16, n_filters=16, n_interactions=2, n_rbf=10)


def small_schnet(seed: int = 0) -> potentials.Potential:
    torch.manual_seed(seed)
    return potentials.build("schnet", species=["Cu"], cutoff=CUTOFF, **HPARAMS)


def config(**kw) -> TrainingConfig:
    base = dict(epochs=12, batch_size=4, lr=5e-3, patience=20, ema_decay=0.9)
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the test machine's few cores are shared, and oversubscription is ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def frames():
    """40 Cu32 frames from 4 short Langevin runs (300-1500 K), EMT labels."""
    return cu_emt_dataset(40, seed=1, sizes=(32,), frames_per_run=10, equilibration=20, sample_every=5)


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    model = small_schnet()
    result = train_potential(model, frames[:30], frames[30:], config(), device="cpu", out_dir=out, progress=False)
    return model, result, out


def test_cu_emt_dataset_is_deterministic_labelled_and_cached(tmp_path):
    kw = dict(seed=3, sizes=(32, 108), frames_per_run=2, equilibration=5, sample_every=3, temperatures=(300, 1500))
    a = cu_emt_dataset(4, path=tmp_path / "cu.extxyz", **kw)
    b = cu_emt_dataset(4, **kw)
    assert [len(x) for x in a] == [32, 32, 108, 108]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-6)
    atoms = b[2].copy()
    atoms.calc = EMT()  # the labels are EMT's for exactly these positions and cell
    np.testing.assert_allclose(b[2].info[REF_ENERGY], atoms.get_potential_energy(), rtol=1e-10)
    np.testing.assert_allclose(b[2].arrays[REF_FORCES], atoms.get_forces(), atol=1e-10)
    np.testing.assert_allclose(b[2].info[REF_STRESS], atoms.get_stress(), atol=1e-10)
    assert {x.info["temperature_K"] for x in b} == {300.0, 1500.0}
    again = cu_emt_dataset(4, path=tmp_path / "cu.extxyz", **kw)  # read back from the cache file
    np.testing.assert_allclose(again[3].arrays[REF_FORCES], b[3].arrays[REF_FORCES], atol=1e-7)
    other = cu_emt_dataset(3, path=tmp_path / "cu.extxyz", **kw)  # other arguments: regenerated, not the cache
    assert len(other) == 3


def test_training_lowers_force_error_fits_e0_and_saves_best(frames, trained):
    model, result, out = trained
    e0 = fit_e0(frames[:30])[29]
    assert model.e0.item() == pytest.approx(e0, rel=1e-6)
    rms_f = math.sqrt(np.mean(np.concatenate([a.arrays[REF_FORCES].ravel() for a in frames[:30]]) ** 2))
    assert model.scale.item() == pytest.approx(rms_f, rel=1e-5)
    initial = result.history[0]["valid_forces_rmse"]
    assert result.metrics["valid"]["forces_rmse"] < 0.5 * initial
    assert result.best_valid_loss < 0.3 * result.initial_valid_loss
    assert result.n_train == 30 and result.n_valid == 10 and result.n_test == 0
    # the checkpoint holds the returned (best) weights
    loaded = potentials.load(out / "best.pt", device="cpu")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert evaluate(loaded, frames[30:])["forces_rmse"] == pytest.approx(result.metrics["valid"]["forces_rmse"], rel=1e-5)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["valid"]["forces_rmse"] == pytest.approx(result.metrics["valid"]["forces_rmse"])
    assert saved["units"]["forces"] == "eV/Å" and saved["best_epoch"] == result.best_epoch
    json.dumps(result.to_dict())


def test_warm_start_begins_below_scratch(frames, trained, tmp_path):
    model, _, _ = trained
    cfg = config(epochs=1)
    scratch = train_potential(small_schnet(seed=5), frames[:30], frames[30:], cfg, device="cpu", progress=False)
    warm = train_potential(small_schnet(seed=5), frames[:30], frames[30:], cfg, device="cpu", progress=False,
                           init_from=model)
    assert warm.warm_start and not scratch.warm_start
    assert warm.initial_valid_loss < 0.2 * scratch.initial_valid_loss
    other = potentials.build("schnet", species=["Cu"], cutoff=CUTOFF, **{**HPARAMS, "n_interactions": 1})
    with pytest.raises(ValueError, match="n_interactions"):
        train_potential(other, frames[:30], frames[30:], cfg, device="cpu", progress=False, init_from=model)


def test_warm_start_never_keeps_the_untrained_weights(frames, trained):
    """New labels that make the old validation frames worse must still be learnt, not discarded.

    The new training frames carry forces ×3 (a different "oracle"): training on them can only raise the
    loss on the old validation frames, so the warm-start weights are the best on validation. Early
    stopping must still return trained weights (best epoch >= 1), never the untouched previous model.
    """
    model, _, _ = trained
    shifted = []
    for atoms in frames[:8]:
        atoms = atoms.copy()
        atoms.arrays[REF_FORCES] = 3.0 * atoms.arrays[REF_FORCES]
        shifted.append(atoms)
    warm = small_schnet(seed=7)
    result = train_potential(warm, shifted, frames[30:], config(epochs=3, patience=1), device="cpu",
                             progress=False, init_from=model)
    assert result.best_valid_loss > result.initial_valid_loss  # the scenario: the old weights were best
    assert result.best_epoch >= 1
    changed = [not torch.equal(a, b) for a, b in zip(warm.state_dict().values(), model.state_dict().values())]
    assert any(changed)


def test_divergence_stops_and_keeps_last_good_checkpoint(frames, tmp_path):
    model = small_schnet()
    with pytest.raises(TrainingDivergedError, match="diverged") as info:
        train_potential(model, frames[:8], frames[8:10], config(grad_clip=None).model_copy(update={"lr": 1e30}), device="cpu",
                        out_dir=tmp_path, progress=False)
    assert info.value.checkpoint == str(tmp_path / "best.pt") and info.value.best_epoch == 0
    good = potentials.load(tmp_path / "best.pt", device="cpu")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    for name, tensor in model.state_dict().items():  # the model got the last good weights back
        torch.testing.assert_close(good.state_dict()[name], tensor)


def test_bad_input_is_a_clear_error(frames):
    with pytest.raises(ValueError, match="too few frames"):
        train_potential(small_schnet(), frames[:1], [], config(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="too few frames"):
        train_committee([small_schnet(), small_schnet(1)], frames[:1], config(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="valid_fraction"):
        train_committee([small_schnet()], frames[:5], config(valid_fraction=0.0), device="cpu", progress=False)
    gold = frames[0].copy()
    gold.numbers[[0, 5]] = 79
    gold.calc = EMT()
    gold.info[REF_ENERGY] = gold.get_potential_energy()
    gold.arrays[REF_FORCES] = gold.get_forces()
    with pytest.raises(UnknownElementError, match=r"Au \(Z=79\)"):
        train_potential(small_schnet(), [gold, frames[1]], [frames[2]], config(), device="cpu", progress=False)
    broken = frames[3].copy()
    broken.arrays[REF_FORCES] = broken.arrays[REF_FORCES].copy()
    broken.arrays[REF_FORCES][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_potential(small_schnet(), [broken, frames[1]], [frames[2]], config(), device="cpu", progress=False)


def test_max_time_stops_after_one_epoch_and_float64_on_request(frames):
    model = small_schnet()
    result = train_potential(model, frames[:8], frames[8:10], config(max_time_s=1e-3), device="cpu", dtype="float64",
                             progress=False)
    assert result.stop_reason == "max_time" and result.epochs == 1
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.gpu
def test_training_on_cuda(frames, tmp_path):
    model = small_schnet()
    result = train_potential(model, frames[:8], frames[8:10], config(epochs=3), device="cuda", out_dir=tmp_path,
                             progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert result.metrics["valid"]["forces_rmse"] < result.history[0]["valid_forces_rmse"]
    assert potentials.load(tmp_path / "best.pt", device="cpu").e0.device.type == "cpu"


def test_committee_bootstrap_split_and_mean_metrics(frames, tmp_path):
    members = [small_schnet(1), small_schnet(2)]
    cfg = config(epochs=2, valid_fraction=0.2, test_fraction=0.2)
    result = train_committee(members, frames[:20], cfg, bootstrap=True, device="cpu", seed=4, out_dir=tmp_path,
                             progress=False)
    assert len(result.valid_idx) == 4 and len(result.test_idx) == 4 and len(result.train_idx) == 12
    assert not set(result.train_idx) & set(result.valid_idx + result.test_idx)
    assert [m.n_train for m in result.members] == [12, 12]
    for k in range(2):
        assert (tmp_path / f"member_{k}" / "best.pt").is_file()
    # the committee metric is the error of the members' mean prediction
    test = [frames[i] for i in result.test_idx]
    preds = []
    for m in members:
        m.eval()
        out = m(potentials_batch(test), forces=True)
        preds.append(out["forces"].detach())
    ref = np.concatenate([a.arrays[REF_FORCES] for a in test])
    rmse = float(np.sqrt(np.mean((torch.stack(preds).mean(0).numpy() - ref) ** 2)))
    assert result.metrics["test"]["forces_rmse"] == pytest.approx(rmse, rel=1e-4)
    assert evaluate(Committee(members), test)["forces_rmse"] == pytest.approx(rmse, rel=1e-4)  # vmapped committee mean
    assert json.loads((tmp_path / "metrics.json").read_text())["test_idx"] == list(result.test_idx)


def potentials_batch(frames):
    from alflow.graph import atoms_to_batch

    return atoms_to_batch(frames, CUTOFF)


def test_cli_train_end_to_end(frames, tmp_path, capsys):
    data = tmp_path / "data.extxyz"
    write_extxyz_atomic(frames[:12], data)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: tiny
        system:
          build: {{element: Cu, cubic: true}}
        potential:
          architecture: schnet
          cutoff: {CUTOFF}
          hparams: {json.dumps(HPARAMS)}
        committee: {{size: 2, calibration_min_frames: 4}}
        training: {{epochs: 2, batch_size: 4, valid_fraction: 0.25}}
        """))
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--data", str(data), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "committee" in text and "member 1" in text
    committee = potentials.load(out / "committee.pt", device="cpu")
    assert len(committee.members) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["valid"]["n_frames"] == 3 and len(metrics["members"]) == 2
    # the training cost the loop reports: members mode, epochs over all members, seconds
    assert metrics["extra"]["members_mode"] == "sequential" and metrics["extra"]["epochs"] == 4
    assert "members trained sequential on cpu, 4 epochs in all" in text
    assert "calibration skipped: 3 validation frame(s)" in text and float(committee.alpha) == 1.0
    cfg.write_text(cfg.read_text().replace("calibration_min_frames: 4", "calibration_min_frames: 3"))
    assert main(["train", str(cfg), "--data", str(data), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "calibration: alpha = " in capsys.readouterr().out
    assert float(potentials.load(out / "committee.pt", device="cpu").alpha) != pytest.approx(1.0, rel=1e-3)
    assert main(["train", str(cfg), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    assert "no dataset" in capsys.readouterr().err


def test_train_stage_reports_training_epochs_and_seconds(frames, tmp_path):
    """The loop's train stage records the training cost (epochs over all members, seconds, members mode)."""
    from alflow.data import Dataset
    from alflow.report import iteration_table
    from alflow.stages import compute_stage

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(textwrap.dedent(f"""\
        name: tiny
        system:
          build: {{element: Cu, cubic: true}}
        potential:
          architecture: schnet
          cutoff: {CUTOFF}
          hparams: {json.dumps(HPARAMS)}
        committee: {{size: 2, calibrate: false}}
        training: {{epochs: 2, batch_size: 4, valid_fraction: 0.25, members: grouped}}
        """))
    Dataset(run / "dataset").append(frames[:12], source="test")
    result = compute_stage(run, "train", 0, {"species": [29]})
    assert result["train_epochs"] == 4 and result["members_mode"] == "grouped"
    assert 0 < result["train_seconds"] <= result["seconds"]
    from alflow.config import LoopConfig
    from alflow.loop import iteration_row

    row = iteration_row(0, result, {"walkers": [], "statuses": {}, "seconds": 0.0},
                        {"n_frames": 0, "n_accurate": 0, "n_candidate": 0, "n_failed": 0, "n_selected": 0,
                         "seconds": 0.0}, None, 0, LoopConfig())
    assert row["train_epochs"] == 4 and row["train_fit_seconds"] == result["train_seconds"]
    head, body = iteration_table([row])
    assert body[0][head.index("train epochs")] == "4"


@pytest.mark.parametrize("element", ["Si", "Ge", "Mo", "Li"])
def test_mlearn_examples_and_benchmark_configs_are_valid(element, tmp_path):
    """examples/mlearn/<El>.yaml validate; benchmarks/mlearn.py's written config.yaml is one `alflow train` accepts."""
    import argparse
    import importlib.util
    from pathlib import Path

    import yaml

    from alflow.config import load_config

    root = Path(__file__).resolve().parents[2]
    example = load_config(root / "examples" / "mlearn" / f"{element}.yaml")
    assert example.committee.size == 4 and example.training.final_epochs > 0
    assert example.system.initial_dataset.endswith(f"shared/data/mlearn/{element}_train.extxyz")
    spec = importlib.util.spec_from_file_location("mlearn_benchmark", root / "benchmarks" / "mlearn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(epochs=3, max_time=60.0, members=None, members_mode="grouped", arch=None, hparams=None,
                              device="cpu", training='{"final_epochs": 1}')
    cfg = bench.element_config(element, args, tmp_path / "data.extxyz", tmp_path / "out")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded.training.epochs == 3 and loaded.training.max_time_s == 15.0 and loaded.training.final_epochs == 1
    args.training, args.epochs = None, 40
    cfg = bench.element_config(element, args, tmp_path / "data.extxyz", tmp_path / "out")
    assert cfg["training"]["final_epochs"] == round(40 * example.training.final_epochs / example.training.epochs)
    assert loaded.training.members == "grouped" and loaded.execution.device == "cpu"
    assert Path(loaded.system.initial_dataset) == (tmp_path / "data.extxyz").resolve()
