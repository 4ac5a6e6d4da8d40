"""Selection strategies (alflow.select) on frames with constructed committee scores and known answers.

Frames are rattled/strained Cu fcc cells; the scores are set by hand, so every
expected selection follows from the rules alone.
"""

from __future__ import annotations

import json
import math

import ase.io
import numpy as np
import pytest
from pydantic import ValidationError
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from alflow.cli import main
from alflow.config import SelectionConfig
from alflow.data import Dataset
from alflow.io import frame_hash
from alflow.keys import ENERGY_DEVIATION_PER_ATOM, MAX_FORCE_DEVIATION, REF_ENERGY, REF_FORCES
from alflow.select import REJECTION_REASON, SELECTION_REASON, physical_rejection, select_frames, structure_descriptors


def frame(fdev: float, walker: int = 0, step: int = 0, edev: float = 0.0, seed: int = 0, strain: float = 0.0,
          rattle: float = 0.03):
    atoms = bulk("Cu", "fcc", a=3.61 * (1 + strain), cubic=True)
    atoms.rattle(rattle, seed=seed)
    atoms.info.update({MAX_FORCE_DEVIATION: fdev, ENERGY_DEVIATION_PER_ATOM: edev, "walker": walker, "step": step,
                       "iteration": 1})
    return atoms


def cfg(**kw) -> SelectionConfig:
    return SelectionConfig(**{"diversity": "none", "max_per_iteration": 100, **kw})


def selected_devs(sel) -> list[float]:
    return [a.info[MAX_FORCE_DEVIATION] for a in sel.frames]


def test_trust_window_classes_and_ranking():
    devs = [0.01, 0.05, 0.2, 0.49, 0.5, 1.0, math.nan]
    sel = select_frames([frame(d, step=i, seed=i) for i, d in enumerate(devs)], cfg(lower=0.05, upper=0.5))
    assert selected_devs(sel) == [0.49, 0.2, 0.05]  # candidates only, most uncertain first; failed never
    s = sel.summary
    assert (s["n_accurate"], s["n_candidate"], s["n_failed"], s["n_selected"]) == (1, 3, 3, 3)
    assert s["per_walker"]["0"]["candidate"] == 3 and not s["adaptive"]
    assert all(a.info[SELECTION_REASON].startswith("candidate") for a in sel.frames)
    assert "max_force_deviation=0.49" in sel.frames[0].info[SELECTION_REASON]


def test_energy_window_combines_with_force_window():
    frames = [frame(0.01, step=0, edev=0.05, seed=0),  # force accurate, energy candidate -> candidate
              frame(0.2, step=1, edev=0.2, seed=1),  # energy failed -> failed
              frame(0.01, step=2, edev=0.001, seed=2)]  # both accurate
    sel = select_frames(frames, cfg(energy_lower=0.01, energy_upper=0.1))
    assert [a.info["step"] for a in sel.frames] == [0]
    assert (sel.summary["n_candidate"], sel.summary["n_failed"], sel.summary["n_accurate"]) == (1, 1, 1)


def test_adaptive_lower_level_takes_the_most_uncertain_fraction():
    devs = [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.04, 5.0]  # no candidate; one failed
    frames = [frame(d, step=i, seed=i) for i, d in enumerate(devs)]
    assert select_frames(frames, cfg()).frames == []
    sel = select_frames(frames, cfg(adaptive_fraction=0.25))
    assert selected_devs(sel) == [0.04, 0.007]  # ceil(0.25 * 8 non-failed) = 2, the failed frame never
    assert sel.summary["adaptive"] and sel.frames[0].info[SELECTION_REASON].startswith("adaptive")


def test_adaptive_level_tops_up_too_few_candidates_to_the_budget():
    devs = [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.03, 0.04, 0.2, 5.0]  # one candidate (0.2), one failed
    frames = [frame(d, step=i, seed=i) for i, d in enumerate(devs)]
    assert selected_devs(select_frames(frames, cfg(diversity="none", max_per_iteration=3))) == [0.2]
    sel = select_frames(frames, cfg(diversity="none", max_per_iteration=3, adaptive_fraction=0.3))
    # ceil(0.3 * 9 non-failed) = 3: the candidate and the two most uncertain accurate frames; never the failed one
    assert selected_devs(sel) == [0.2, 0.04, 0.03]
    reasons = [a.info[SELECTION_REASON] for a in sel.frames]
    assert reasons[0].startswith("candidate") and all(r.startswith("adaptive") for r in reasons[1:])
    # enough candidates for the budget: no top-up
    full = select_frames(frames, cfg(diversity="none", max_per_iteration=1, adaptive_fraction=0.3))
    assert selected_devs(full) == [0.2] and not full.summary["adaptive"]


def test_top_k_with_caps_per_iteration_and_per_walker():
    frames = [frame(0.1 + 0.01 * i, walker=0, step=i, seed=i) for i in range(10)]
    frames += [frame(0.1 + 0.001 * i, walker=1, step=i, seed=100 + i) for i in range(10)]
    sel = select_frames(frames, cfg(max_per_iteration=5, max_per_walker=3))
    assert [(a.info["walker"], a.info["step"]) for a in sel.frames] == [(0, 9), (0, 8), (0, 7), (1, 9), (1, 8)]
    assert sel.summary["per_walker"]["0"]["selected"] == 3 and sel.summary["per_walker"]["1"]["selected"] == 2


def test_min_stride_between_selected_frames_of_one_walker():
    frames = [frame(0.1 + 0.01 * i, step=i, seed=i) for i in range(10)]
    sel = select_frames(frames, cfg(min_stride=3))
    assert [a.info["step"] for a in sel.frames] == [9, 6, 3, 0]
    # strides are per walker: another walker's steps do not block
    other = [frame(0.3, walker=1, step=8, seed=50)]
    sel = select_frames(frames + other, cfg(min_stride=3))
    assert (1, 8) in [(a.info["walker"], a.info["step"]) for a in sel.frames]


def clusters():
    """Three clusters of candidates in structure space: equilibrium, +6 % and -4 % lattice strain."""
    out = []
    for c, strain in enumerate((0.0, 0.06, -0.04)):
        for k in range(4):
            out.append(frame(0.1 + 0.001 * k + (0.01 if c == 0 else 0.0), walker=c, step=k, seed=10 * c + k,
                             strain=strain, rattle=0.01))
    return out


def test_fps_picks_one_frame_per_cluster():
    sel = select_frames(clusters(), cfg(diversity="fps", max_per_iteration=3))
    assert sorted(a.info["walker"] for a in sel.frames) == [0, 1, 2]
    assert sel.frames[0].info["walker"] == 0  # empty dataset: the most uncertain candidate first
    assert "fps pick" in sel.frames[1].info[SELECTION_REASON]
    top = select_frames(clusters(), cfg(diversity="none", max_per_iteration=3))
    assert [a.info["walker"] for a in top.frames] == [0, 0, 0]  # pure top-k would spend the budget on one cluster


def test_fps_pool_samples_only_among_the_most_uncertain():
    """fps_pool = 1 with a budget of 2: only the 2 most uncertain candidates compete, however close they are."""
    frames = clusters()
    frames[5].info[MAX_FORCE_DEVIATION] = 0.3  # cluster 1 (+6 %): the two most uncertain frames
    frames[6].info[MAX_FORCE_DEVIATION] = 0.25
    everywhere = select_frames(frames, cfg(diversity="fps", max_per_iteration=2))
    assert sorted(a.info["walker"] for a in everywhere.frames) != [1, 1]  # plain fps leaves the cluster
    pooled = select_frames(frames, cfg(diversity="fps", max_per_iteration=2, fps_pool=1))
    assert sorted(a.info[MAX_FORCE_DEVIATION] for a in pooled.frames) == [0.25, 0.3]
    wider = select_frames(frames, cfg(diversity="fps", max_per_iteration=2, fps_pool=6))  # 12 >= every candidate
    assert [a.info["step"] for a in wider.frames] == [a.info["step"] for a in everywhere.frames]
    with pytest.raises(ValidationError):
        cfg(fps_pool=0.5)


def test_fps_excludes_candidates_near_the_dataset(tmp_path):
    cands = clusters()
    known = cands[0].copy()
    known.positions[0] += 1e-4  # not the same hash, but the same structure for the descriptor
    known.info[REF_ENERGY] = 0.0
    known.arrays[REF_FORCES] = np.zeros((len(known), 3))
    ds = Dataset(tmp_path / "ds")
    ds.append(known)
    sel = select_frames(cands, cfg(diversity="fps", max_per_iteration=2), ds)
    assert sorted(a.info["walker"] for a in sel.frames) == [1, 2]  # farthest from the dataset first
    (near,) = sel.rejected
    assert near.info["step"] == 0 and near.info["walker"] == 0
    assert near.info[REJECTION_REASON].startswith("near_dataset")
    assert sel.summary["n_near_dataset"] == 1
    # the exact frame already in the dataset is not selected again
    dup = known.copy()
    dup.info[MAX_FORCE_DEVIATION] = 0.3
    sel = select_frames([dup], cfg(), [known])
    assert sel.frames == [] and sel.summary["n_duplicate"] == 1
    assert select_frames([dup], cfg(), ds.hashes).summary["n_duplicate"] == 1


def test_random_baseline_is_seeded_and_uses_the_budget():
    frames = [frame(0.01 * (i % 7), walker=i % 3, step=i, seed=i) for i in range(30)]
    a = select_frames(frames, cfg(strategy="random"), seed=1, budget=6)
    b = select_frames(frames, cfg(strategy="random"), seed=1, budget=6)
    c = select_frames(frames, cfg(strategy="random"), seed=2, budget=6)
    steps = lambda s: [f.info["step"] for f in s.frames]  # noqa: E731
    assert steps(a) == steps(b) and steps(a) != steps(c)
    assert len(a.frames) == 6 and a.summary["strategy"] == "random" and a.summary["seed"] == 1
    assert all(f.info[SELECTION_REASON].startswith("random") for f in a.frames)
    capped = select_frames(frames, cfg(strategy="random", max_per_walker=1), seed=1, budget=6)
    assert sorted(f.info["walker"] for f in capped.frames) == [0, 1, 2]
    unscored = [f.copy() for f in frames]
    for f in unscored:
        del f.info[MAX_FORCE_DEVIATION]
    assert len(select_frames(unscored, cfg(strategy="random"), budget=4).frames) == 4
    with pytest.raises(ValueError, match="max_force_deviation"):
        select_frames(unscored, cfg())


def test_physical_filters_reject_with_reasons():
    good = frame(0.2, step=0, seed=0)
    close = frame(0.2, step=1, seed=1)
    close.positions[1] = close.positions[0] + [0.5, 0.0, 0.0]
    forceful = frame(0.2, step=2, seed=2)
    forceful.calc = SinglePointCalculator(forceful, forces=np.full((len(forceful), 3), 40.0))  # |F| = 69 eV/Å
    sparse = frame(0.2, step=3, seed=3)
    sparse.set_cell(sparse.cell * 7, scale_atoms=True)  # 4 atoms in 16000 Å³
    skewed = frame(0.2, step=4, seed=4)
    skewed.set_cell([[3.61, 0, 0], [3.55, 0.4, 0], [0, 0, 3.61]], scale_atoms=True)
    squeezed = frame(0.2, step=5, seed=5)  # 1.0 Å > 0.6 Å, but < 0.5 x (1.32 + 1.32) Å for Cu-Cu
    squeezed.positions[1] = squeezed.positions[0] + [0.0, 1.0, 0.0]
    sel = select_frames([good, close, forceful, sparse, skewed, squeezed], cfg())
    assert [a.info["step"] for a in sel.frames] == [0]
    reasons = {a.info["step"]: a.info[REJECTION_REASON] for a in sel.rejected}
    assert reasons[1].startswith("min_distance") and "0.500 Å" in reasons[1]
    assert reasons[5].startswith("min_distance") and "1.000 Å" in reasons[5] and "< 1.32 Å" in reasons[5]
    assert reasons[2].startswith("max_force")
    assert reasons[3].startswith("cell_volume")
    assert reasons[4].startswith("cell_angles")
    assert sel.summary["n_filtered"] == 5 and sel.summary["rejections"]["min_distance"] == 2
    assert physical_rejection(good, cfg()) is None
    assert physical_rejection(squeezed, cfg(covalent_fraction=0.3)) is None  # absolute 0.6 Å floor only
    nan = good.copy()
    nan.positions[0, 0] = np.nan
    assert physical_rejection(nan, cfg()).startswith("non_finite")


def test_physical_filter_levels_come_from_the_config():
    """covalent_fraction, volume_per_atom and cell_angles are selection fields (and reach select_frames)."""
    squeezed = frame(0.2, step=5, seed=5)  # 1.0 Å pair: rejected at covalent_fraction 0.5, kept at 0.3
    squeezed.positions[1] = squeezed.positions[0] + [0.0, 1.0, 0.0]
    assert physical_rejection(squeezed, cfg()).startswith("min_distance")
    assert physical_rejection(squeezed, cfg(covalent_fraction=0.3)) is None
    assert [a.info["step"] for a in select_frames([squeezed], cfg(covalent_fraction=0.3)).frames] == [5]
    sheared = frame(0.2, step=6, seed=6)  # gamma = 84.3 degrees
    sheared.set_cell([[3.61, 0, 0], [0.36, 3.59, 0], [0, 0, 3.61]], scale_atoms=True)
    assert physical_rejection(sheared, cfg()) is None
    assert physical_rejection(sheared, cfg(cell_angles=(88.0, 92.0))).startswith("cell_angles")
    assert select_frames([sheared], cfg(cell_angles=(88.0, 92.0))).frames == []
    assert physical_rejection(frame(0.2, seed=0), cfg(volume_per_atom=(20.0, 30.0))).startswith("cell_volume")


@pytest.mark.parametrize("field, value", [("volume_per_atom", (5.0, 2.0)), ("cell_angles", (10.0, 200.0)),
                                          ("covalent_fraction", -0.1), ("dataset_distance", -1.0)])
def test_bad_filter_levels_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SelectionConfig(**{field: value})


def test_descriptor_invariances():
    atoms = frame(0.1, seed=3, rattle=0.05)
    rotated = atoms.copy()
    rotated.rotate(37, "x", rotate_cell=True)
    rotated.rotate(11, "z", rotate_cell=True)
    permuted = atoms[[2, 0, 3, 1]]
    shifted = atoms.copy()
    shifted.translate([0.3, -1.2, 5.0])
    x = structure_descriptors([atoms, rotated, permuted, shifted, atoms.repeat((2, 1, 3))])
    np.testing.assert_allclose(x[1:], np.repeat(x[:1], 4, axis=0), atol=1e-12)
    other = structure_descriptors([frame(0.1, seed=4, rattle=0.05, strain=0.03)])
    assert np.linalg.norm(other[0] - x[0]) > 0.05


def test_select_cli_round_trip(tmp_path, capsys):
    paths = []
    for w in range(2):
        traj = [frame(0.02 + 0.1 * i, walker=w, step=i, seed=10 * w + i) for i in range(5)]  # 0.02 accurate
        paths.append(tmp_path / f"walker-{w}.extxyz")
        ase.io.write(paths[-1], traj)
    out, summary = tmp_path / "sel.extxyz", tmp_path / "summary.json"
    assert main(["select", *map(str, paths), "--out", str(out), "--summary", str(summary), "--diversity", "none",
                 "--max-per-walker", "2", "--upper", "0.35"]) == 0
    text = capsys.readouterr().out
    assert "selected 4" in text
    got = ase.io.read(out, index=":")
    assert sorted((a.info["walker"], a.info["step"]) for a in got) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert got[0].info[SELECTION_REASON].startswith("candidate")
    s = json.loads(summary.read_text())
    assert s["per_walker"]["0"] == {"accurate": 1, "candidate": 3, "failed": 1, "filtered": 0,
                                           "near_dataset": 0, "selected": 2}
    assert frame_hash(got[0]) in {frame_hash(a) for p in paths for a in ase.io.read(p, index=":")}
    assert main(["select", str(paths[0]), "--out", str(out), "--lower", "0.6", "--upper", "0.5"]) == 2
