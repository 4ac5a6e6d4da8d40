"""Recalibration (alflow.calibration): per-element scales, isotonic maps, metrics, and a wrong α corrected in the loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from alflow import calibration as cal


def synthetic(scales: dict[int, float], n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Per-atom raw deviations and 3D Gaussian errors whose per-atom RMS is scale_Z × ε."""
    rng = np.random.default_rng(seed)
    raw, err, num = [], [], []
    for z, s in scales.items():
        eps = rng.uniform(0.02, 0.5, size=n)
        comp = rng.normal(size=(n, 3)) * (s * eps / math.sqrt(3))[:, None]
        raw.append(eps)
        err.append(np.linalg.norm(comp, axis=1))
        num.append(np.full(n, z))
    return np.concatenate(raw), np.concatenate(err), np.concatenate(num)


def test_per_element_scale_recovers_known_scales():
    raw, err, num = synthetic({29: 4.0, 79: 0.5}, 4000)
    cmap = cal.fit_map(raw, err, num, kind="scale")
    assert cmap.alphas[29] == pytest.approx(4.0, rel=0.05)
    assert cmap.alphas[79] == pytest.approx(0.5, rel=0.05)
    # the global α lies between them; an element with too few atoms falls back to it
    assert 0.5 < cmap.alpha < 4.0
    few = cal.fit_map(raw, err, num, kind="scale", min_atoms=5000)
    assert few.alphas == {} and np.allclose(few.apply(raw, num), few.alpha * raw)
    out = cmap.apply(np.array([0.1, 0.1, 0.1]), np.array([29, 79, 13]))
    assert out == pytest.approx([0.4, 0.05, 0.1 * cmap.alpha], rel=0.06)


def test_recency_weights_follow_the_newest_data():
    old = synthetic({29: 1.0}, 2000, seed=1)
    new = synthetic({29: 4.0}, 2000, seed=2)
    raw, err, num = (np.concatenate([a, b]) for a, b in zip(old, new, strict=True))
    age = np.concatenate([np.full(2000, 3.0), np.zeros(2000)])
    equal = cal.fit_map(raw, err, num, cal.recency_weights(age, 1.0))
    recent = cal.fit_map(raw, err, num, cal.recency_weights(age, 0.1))
    assert recent.alpha == pytest.approx(4.0, rel=0.06)
    assert equal.alpha < 3.2  # the old data pull an unweighted fit down


def test_isotonic_is_monotone_and_matches_pav():
    kx, ky = cal.isotonic_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert kx.tolist() == [1.0, 2.5, 4.0] and ky.tolist() == [1.0, 2.5, 4.0]
    raw, err, num = synthetic({29: 2.0, 79: 0.7}, 800, seed=3)
    cmap = cal.fit_map(raw, err, num, kind="isotonic")
    grid = np.linspace(0.0, 2.0, 400)  # beyond the data on both sides
    for z in (29, 79, 47):
        c = cmap.apply(grid, np.full(grid.size, z))
        assert np.all(np.diff(c) >= -1e-12) and np.all(c >= 0)
    # on this (scale-generated) data the isotonic map follows the scales on average
    c = cmap.apply(raw, num)
    assert np.mean(c[num == 29] ** 2) / np.mean((2.0 * raw[num == 29]) ** 2) == pytest.approx(1.0, rel=0.15)


def test_map_round_trips_through_json(tmp_path):
    raw, err, num = synthetic({29: 2.0, 79: 0.7}, 300)
    for kind in cal.KINDS:
        cmap = cal.fit_map(raw, err, num, kind=kind, n_frames=7)
        back = cal.CalibrationMap.load(cmap.save(tmp_path / f"{kind}.json"))
        json.loads((tmp_path / f"{kind}.json").read_text())
        assert back.kind == kind and back.n_frames == 7
        assert np.allclose(back.apply(raw, num), cmap.apply(raw, num))
    with pytest.raises(ValueError, match="committee.calibration"):
        cal.fit_map(raw, err, num, kind="linear")


def test_metrics_on_known_inputs():
    assert cal.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert cal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert cal.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    assert cal.spearman([1, 1, 1], [1, 2, 3]) is None
    # NLL of one atom, c = √3 (σ = 1 per component), |ΔF|² = 2: 1.5 ln 2π + 1
    assert cal.gaussian_nll([math.sqrt(3)], [math.sqrt(2)]) == pytest.approx(1.5 * math.log(2 * math.pi) + 1.0)
    # calibrated data: area near 0; 5x overconfident: large
    raw, err, num = synthetic({29: 1.0}, 20000, seed=4)
    assert cal.miscalibration_area(raw, err) < 0.01
    assert cal.miscalibration_area(raw / 5, err) > 0.3
    assert cal.gaussian_nll(raw, err) < cal.gaussian_nll(raw / 5, err)
    # the χ²₃ CDF at its median 2.365974
    assert cal._chi2_3_cdf(np.array([2.365974])) == pytest.approx([0.5], abs=1e-6)
    cov, n = cal.coverage([0.01, 0.02, 0.03, 0.5], [0.01, 0.2, 0.04, 0.01], lower=0.05, target=0.05)
    assert (cov, n) == (pytest.approx(2 / 3), 3)
    assert cal.coverage([1.0], [0.0], lower=0.05, target=0.05) == (None, 0)
    m = cal.metrics(raw[:30], err[:30], num[:30], np.arange(30) // 3, cal.CalibrationMap(alpha=2.0), 0.05, 0.05)
    assert m["n_frames"] == 10 and m["calibrated"]["nll"] == pytest.approx(cal.gaussian_nll(2 * raw[:30], err[:30]))


@pytest.mark.slow
def test_a_wrong_alpha_is_corrected_after_one_iteration(tmp_path):
    """α = 0.1 (10x overconfident or worse) explores, its frames are labelled by EMT; the refit from those
    labels gives α within 2x of the committee's true error ratio on every explored frame, which 0.1 is not."""
    import ase.io
    from ase.calculators.emt import EMT

    import potentials
    from alflow import keys
    from alflow.stages import compute_stage
    from test_loop import tiny_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = tiny_config(run_dir, exploration={"walkers": [{"temperature": 600, "steps": 40, "stride": 5}]},
                       selection={"max_per_iteration": 4}, training={"epochs": 4})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
    initial = compute_stage(run_dir, "initial", None, {})
    train = compute_stage(run_dir, "train", 0, {"species": initial["species"], "init_from": None})
    path = run_dir / train["committee"]
    committee = potentials.load(path)
    committee.set_alpha(0.1)
    potentials.save(committee, path)
    cal.CalibrationMap(alpha=0.1).save(path.parent / cal.FILE)
    explore = compute_stage(run_dir, "explore", 0, {"model": str(path)})
    trajectories = [str(run_dir / w["trajectory"]) for w in explore["walkers"]]
    select = compute_stage(run_dir, "select", 0, {"trajectories": trajectories, "budget": 4})
    label = compute_stage(run_dir, "label", 0, {"selected": str(run_dir / select["selected"]),
                                               "predictions": str(run_dir / select["predictions"])})
    assert label["n_labelled"] >= 2 and label["calibration"]["n_frames"] == label["n_labelled"]
    pairs = cal.read_pairs(run_dir / "iter_000" / "label" / cal.PAIRS_FILE)
    cmap, record = cal.recalibrate(committee, [], [pairs], 1)
    # the true ratio on every explored frame (EMT), at α = 1
    frames = [a for t in trajectories for a in ase.io.read(t, index=":")]
    for atoms in frames:
        atoms.calc = EMT()
        atoms.arrays[keys.REF_FORCES] = atoms.get_forces()
        atoms.info[keys.REF_ENERGY] = atoms.get_potential_energy()
        atoms.calc = None
    truth = cal.committee_pairs(committee, frames)
    ratio = math.sqrt(np.mean(truth["error"] ** 2 / truth["raw"] ** 2))
    print(f"true ratio {ratio:.3g}, refitted alpha {cmap.alpha:.3g} from {pairs['frame'].max() + 1} labelled frames")
    assert ratio > 0.2  # 0.1 is wrong by more than 2x ...
    assert ratio / 2 < cmap.alpha < 2 * ratio  # ... and the refit is right within 2x
    assert float(committee.alpha) == pytest.approx(cmap.alpha)
    # the labelled frames' metrics: the wrong α was overconfident there (held out from the fit)
    assert label["calibration"]["calibrated"]["miscalibration_area"] > 0.2
    assert Path(run_dir / "iter_000" / "label" / "errors.json").is_file()


def test_select_stage_applies_the_map_to_scored_frames(tmp_path):
    """Selection thresholds see calibrated deviations: the per-element map replaces the engine's α-scaled
    deviation (per atom and max); the raw ones (α = 1) are kept for the calibration pairs."""
    from ase.build import bulk

    from alflow import keys
    from alflow.explore.frames import scored_frame
    from alflow.stages import _calibrate_frames

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[:2] = 79
    raw = np.array([0.1, 0.2, 0.05, 0.3])
    engine_alpha = 2.0
    scores = {keys.MAX_FORCE_DEVIATION: engine_alpha * raw.max(), keys.ENERGY_DEVIATION_PER_ATOM: 0.0,
              "energy": 0.0, "forces": np.zeros((4, 3)), "force_deviation": engine_alpha * raw}
    frame = scored_frame(atoms, scores, 0, "w", 300.0, alpha=engine_alpha)
    cmap = cal.CalibrationMap(alpha=2.0, alphas={79: 5.0, 29: 1.0})
    _calibrate_frames([frame], cmap.save(tmp_path / cal.FILE))
    assert frame.arrays[cal.RAW_FORCE_DEVIATION] == pytest.approx(raw)
    assert frame.arrays[keys.FORCE_DEVIATION] == pytest.approx([0.5, 1.0, 0.05, 0.3])
    assert frame.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(1.0)
    assert frame.info[cal.RAW_MAX_FORCE_DEVIATION] == pytest.approx(0.3)


def test_config_kinds_are_the_module_table():
    """committee.calibration accepts exactly alflow.calibration.KINDS, and its default is one of them."""
    import typing

    from alflow.config import CommitteeConfig

    field = CommitteeConfig.model_fields["calibration"]
    assert set(typing.get_args(field.annotation)) == set(cal.KINDS) and field.default in cal.KINDS
