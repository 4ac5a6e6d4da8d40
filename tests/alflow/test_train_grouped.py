"""Members trained together (stacked parameters + vmap) equal members trained one after another.

Real parts only: small SchNets on 4- and 32-atom Cu cells labelled by ASE's EMT, in float64 so that
the two paths agree to rounding. Also the device-side data path (packed graphs, atom budgets), the
stacked AdamW and the LR schedule / final stage of the recipe.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import potentials
from alflow import keys
from alflow.config import TrainingConfig
from alflow.datasets import cu_emt_dataset
from alflow.metrics import GraphCache
from alflow.train import (
    PackedGraphs,
    StackedAdamW,
    _Progress,
    make_batches,
    members_mode,
    train_committee,
)

CUTOFF = 4.0
HPARAMS = dict(n_atom_basis=8, n_filters=8, n_interactions=2, n_rbf=6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def frames():
    """24 Cu frames, 4 and 32 atoms (so atom budgets give batches of different frame counts), EMT labels."""
    return cu_emt_dataset(24, seed=1, sizes=(4, 32), frames_per_run=6, equilibration=10, sample_every=3)


def members(n: int = 2) -> list[potentials.Potential]:
    out = []
    for seed in range(1, n + 1):
        torch.manual_seed(seed)
        out.append(potentials.build("schnet", species=["Cu"], cutoff=CUTOFF, **HPARAMS))
    return out


def run(frames, mode: str, **kw):
    base = dict(epochs=3, batch_size=4, batch_atoms=50, lr=5e-3, patience=20, ema_decay=0.9, valid_fraction=0.25)
    cfg = TrainingConfig(**{**base, **kw, "members": mode})
    models = members()
    result = train_committee(models, frames, cfg, bootstrap=True, device="cpu", dtype="float64", seed=3,
                             progress=False)
    return models, result


@pytest.mark.parametrize("recipe", [
    {},  # today's recipe: plateau, MSE
    dict(epochs=4, schedule="cosine", warmup_epochs=1.5, loss="huber", huber_delta=0.05, final_epochs=2,
         stress_weight=1.0, grad_clip=0.5),
])
def test_grouped_training_equals_sequential(frames, recipe):
    seq_models, seq = run(frames, "sequential", **recipe)
    grp_models, grp = run(frames, "grouped", **recipe)
    assert seq.extra["members_mode"] == "sequential" and grp.extra["members_mode"] == "grouped"
    assert (seq.train_idx, seq.valid_idx) == (grp.train_idx, grp.valid_idx)
    for a, b in zip(seq.members, grp.members):
        assert a.n_train == b.n_train and a.epochs == b.epochs and a.best_epoch == b.best_epoch
        assert a.stop_reason == b.stop_reason
        assert len(a.history) == len(b.history) == a.epochs + 1
        for ha, hb in zip(a.history, b.history):
            for key in ("train_loss", "valid_loss", "valid_forces_rmse", "lr", "stage"):
                if ha[key] is None:
                    assert hb[key] is None
                else:
                    assert hb[key] == pytest.approx(ha[key], rel=1e-9, abs=1e-12), (key, ha["epoch"])
        assert b.metrics["valid"]["forces_rmse"] == pytest.approx(a.metrics["valid"]["forces_rmse"], rel=1e-9)
    if recipe:
        assert [h["stage"] for h in seq.members[0].history][-2:] == [2, 2]  # the final stage ran
    # the members differ from each other (own seeds, bootstraps, batch orders) and are trained
    assert seq.members[0].history[1]["train_loss"] != pytest.approx(seq.members[1].history[1]["train_loss"])
    for ms, mg in zip(seq_models, grp_models):
        for (name, ts), tg in zip(ms.state_dict().items(), mg.state_dict().values()):
            torch.testing.assert_close(tg, ts, rtol=1e-8, atol=1e-10, msg=name)


def test_grouped_early_stopping_freezes_each_member_on_its_own(frames):
    """patience=1: members stop at their own epochs; the grouped path stops each as the sequential path does."""
    kw = dict(epochs=6, patience=1, lr=3e-2)
    _, seq = run(frames, "sequential", **kw)
    _, grp = run(frames, "grouped", **kw)
    assert [m.epochs for m in grp.members] == [m.epochs for m in seq.members]
    assert [m.stop_reason for m in grp.members] == [m.stop_reason for m in seq.members]
    assert any(m.stop_reason == "patience" for m in seq.members)
    for a, b in zip(seq.members, grp.members):
        assert b.best_valid_loss == pytest.approx(a.best_valid_loss, rel=1e-9)


def test_packed_gather_equals_graph_cache_collate(frames):
    cache = GraphCache(frames, CUTOFF, torch.float64, torch.device("cpu"))
    model = members(1)[0]
    packed = PackedGraphs(cache, model.species_index)
    idx = [5, 17, 0, 9, 9]
    ref, got = cache.collate(idx), packed.gather(idx)
    assert set(ref) <= set(got)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, msg=key)
    # padded: member k's real part is its own batch; the padding sits in a last, dummy structure
    padded = packed.gather_padded([np.array([5, 17]), np.array([0]), np.array([], dtype=np.int64)])
    n_real = [int(packed.n_atoms[[5, 17]].sum()), int(packed.n_atoms[0]), 0]
    assert padded[keys.POSITIONS].shape[:2] == (3, max(n_real) + 2)
    assert padded["atom_mask"].sum(1).tolist() == n_real
    assert padded["struct_mask"].sum(1).tolist() == [2, 1, 0]
    one = cache.collate([5, 17])
    torch.testing.assert_close(padded[keys.POSITIONS][0, : n_real[0]], one[keys.POSITIONS])
    torch.testing.assert_close(padded[keys.EDGE_INDEX][0, :, : one[keys.EDGE_INDEX].shape[1]], one[keys.EDGE_INDEX])
    last = padded[keys.CELL].shape[1] - 1
    assert (padded[keys.BATCH][~padded["atom_mask"]] == last).all()  # padding atoms: the dummy structure only
    n_edges = [int(packed.n_edges[[5, 17]].sum()), int(packed.n_edges[0]), 0]
    for k in range(3):  # padding edges never touch a real atom
        assert (padded[keys.EDGE_INDEX][k, :, n_edges[k]:] >= n_real[k]).all()


def test_atom_budget_batches_cover_every_frame_once(frames):
    n_atoms = np.array([len(a) for a in frames])
    cfg = TrainingConfig(batch_atoms=40, batch_size=2)
    batches = make_batches(np.random.default_rng(0), range(len(frames)), cfg, n_atoms)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(frames)))
    assert np.concatenate(batches).tolist() == np.random.default_rng(0).permutation(len(frames)).tolist()
    for b in batches:
        assert n_atoms[b].sum() <= 40 or len(b) == 1
    assert max(len(b) for b in batches) > 2  # the budget, not batch_size, sets the size: 4-atom frames group
    plain = make_batches(None, range(10), TrainingConfig(batch_size=4), n_atoms)
    assert [len(b) for b in plain] == [4, 4, 2]


def test_stacked_adamw_equals_one_adamw_per_member():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    refs = [x.clone().requires_grad_(True) for x in (a, b)]
    opts = [torch.optim.AdamW([r], lr=lr, weight_decay=0.01) for r, lr in zip(refs, (1e-2, 3e-3))]
    stacked = torch.stack([a, b]).requires_grad_(True)
    opt = StackedAdamW([stacked], weight_decay=0.01)
    for step in range(5):
        grads = [torch.randn(3, 4, dtype=torch.float64) for _ in refs]
        on = torch.tensor([True, step % 2 == 0])  # member 1 frozen every other step
        for r, o, g, active in zip(refs, opts, grads, on.tolist()):
            if active:
                r.grad = g.clone()
                o.step()
        opt.step([torch.stack(grads)], torch.tensor([1e-2, 3e-3], dtype=torch.float64), on)
    torch.testing.assert_close(stacked.detach(), torch.stack([r.detach() for r in refs]), rtol=1e-12, atol=1e-14)


def test_schedule_warmup_cosine_and_final_stage():
    cfg = TrainingConfig(epochs=10, lr=1e-2, schedule="cosine", warmup_epochs=2, final_epochs=3, energy_weight=2.0,
                         final_lr_factor=0.1, patience=50)
    state = _Progress(cfg, warm=False, initial_mse=np.array([1.0, 1.0, 0.0]))
    assert state.lr(0.0) == pytest.approx(1e-4)  # warm-up starts at lr/100
    assert state.lr(2.0) == pytest.approx(1e-2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 2 / 7))))
    assert state.lr(7.0) == pytest.approx(1e-4)  # cosine reaches lr/100 where the final stage starts
    entered = [state.end_epoch(e, np.array([1.0 / e, 1.0, 0.0]))[1] for e in range(1, 8)]
    assert entered == [False] * 6 + [True] and state.stage == 2
    assert state.energy_weight == 20.0 and state.lr(7.5) == pytest.approx(1e-3)
    assert state.best_loss == pytest.approx(20.0 / 7 + 10.0)  # the best stage-one weights, judged by the final loss
    for e in (8, 9):
        state.end_epoch(e, np.array([1.0, 1.0, 0.0]))
    assert not state.done
    state.end_epoch(10, np.array([1.0, 1.0, 0.0]))
    assert state.done and state.stop_reason == "max_epochs"
    early = _Progress(TrainingConfig(epochs=50, patience=2, final_epochs=3), warm=False, initial_mse=np.array([1.0, 0, 0]))
    outcomes = [early.end_epoch(e, np.array([2.0, 0, 0])) for e in (1, 2)]
    assert outcomes[-1] == (False, True) and early.stop_reason == "patience"  # stalled stage one: the final stage starts
    for e in (3, 4, 5):
        early.end_epoch(e, np.array([0.5, 0, 0]))
    assert early.done  # final_epochs later


def test_members_auto_is_sequential_on_cpu_and_for_unmappable_architectures():
    cfg = TrainingConfig()
    assert members_mode(cfg, members(), torch.device("cpu")) == "sequential"
    assert members_mode(cfg, members(), torch.device("cuda")) == "grouped"
    assert members_mode(cfg, members(1), torch.device("cuda")) == "sequential"
    ani_like = members()
    for m in ani_like:
        m.architecture = "ani"
    assert members_mode(cfg, ani_like, torch.device("cuda")) == "sequential"
    assert members_mode(TrainingConfig(members="grouped"), members(), torch.device("cpu")) == "grouped"


def test_grouped_warm_start_and_divergence(frames, tmp_path):
    from alflow.train import TrainingDivergedError

    previous, first = run(frames, "grouped", epochs=2)
    cfg = TrainingConfig(epochs=2, batch_size=4, lr=5e-3, patience=20, ema_decay=0.9, valid_fraction=0.25,
                         members="grouped")
    models = members()
    warm = train_committee(models, frames, cfg, device="cpu", dtype="float64", seed=3, progress=False,
                           init_from=previous)
    assert warm.extra["members_mode"] == "grouped"
    for w, f in zip(warm.members, first.members):
        assert w.warm_start and w.best_epoch >= 1  # the warm-start weights themselves never win
        assert w.initial_valid_loss < 0.5 * f.initial_valid_loss
    bad = cfg.model_copy(update={"lr": 1e30, "grad_clip": None})  # past the config's bound, on purpose
    models = members()
    with pytest.raises(TrainingDivergedError, match="diverged") as info:
        train_committee(models, frames, bad, device="cpu", dtype="float64", seed=3, progress=False, out_dir=tmp_path)
    assert info.value.best_epoch == 0 and info.value.checkpoint == str(tmp_path / "member_0" / "best.pt")
    good = potentials.load(tmp_path / "member_0" / "best.pt", device="cpu")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    for name, tensor in models[0].state_dict().items():  # the member got the last good weights back
        torch.testing.assert_close(good.state_dict()[name], tensor)


@pytest.mark.slow
def test_grouped_mace_equals_sequential(frames):
    """MACE members (mace-torch under vmap, potentials/mace.py) train together as they do one by one."""
    pytest.importorskip("mace")
    hp = dict(hidden_irreps="8x0e + 8x1o", max_ell=1, correlation=2, num_interactions=1, num_radial_basis=4,
              radial_MLP=[8], MLP_irreps="4x0e")
    small = [a for a in frames if len(a) == 4][:10]
    out = {}
    for mode in ("sequential", "grouped"):
        models = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            models.append(potentials.build("mace", species=["Cu"], cutoff=CUTOFF, **hp))
        cfg = TrainingConfig(epochs=2, batch_size=3, lr=5e-3, ema_decay=0.9, valid_fraction=0.3, members=mode)
        out[mode] = train_committee(models, small, cfg, bootstrap=True, device="cpu", dtype="float64", seed=3,
                                    progress=False)
    assert out["grouped"].extra["members_mode"] == "grouped"
    for a, b in zip(out["sequential"].members, out["grouped"].members):
        for ha, hb in zip(a.history, b.history):
            assert hb["valid_loss"] == pytest.approx(ha["valid_loss"], rel=1e-9)
