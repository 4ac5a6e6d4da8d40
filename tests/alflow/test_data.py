"""Tests for the dataset store (alflow.data), the importer (alflow.io) and ``alflow data``.

Labels are real ASE EMT energies/forces/stresses on rattled Cu fcc supercells; no mocks.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect
from ase.stress import voigt_6_to_full_3x3_stress

from alflow.cli import main
from alflow.data import (
    Dataset,
    DatasetError,
    fit_e0,
    format_summary,
    frame_hash,
    read_frames,
    split,
    summary,
    validate_frame,
)
from alflow.io import TMP_PREFIX
from alflow.keys import (
    FRAME_HASH,
    ITERATION,
    LABELLER,
    REF_ENERGY,
    REF_FORCES,
    REF_STRESS,
    SOURCE,
    STATUS,
    STEP,
    TIMESTAMP,
    WALKER,
)

ASE_VASP_DATA = Path(ase.__file__).parent / "test" / "testdata" / "vasp"


def emt_frames(n: int, reps: int = 2, seed: int = 0, stress: bool = True, gold: int = 0) -> list[Atoms]:
    """``n`` rattled Cu fcc (cubic, reps^3 cells) frames with EMT labels; ``gold`` atoms swapped to Au."""
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((reps, reps, reps))
        atoms.numbers[:gold] = 79
        atoms.rattle(0.05, seed=seed * 1000 + i)
        atoms.calc = EMT()
        atoms.info[REF_ENERGY] = atoms.get_potential_energy()
        atoms.arrays[REF_FORCES] = atoms.get_forces()
        if stress:
            atoms.info[REF_STRESS] = atoms.get_stress()
        atoms.calc = None
        out.append(atoms)
    return out


def shard_files(ds: Dataset) -> list[str]:
    return sorted(n for n in os.listdir(ds.shard_dir) if not n.startswith("."))


# -- storage -----------------------------------------------------------------------------------------
def test_roundtrip_labels_provenance_and_mace_readable_file(tmp_path):
    frames = emt_frames(4)
    voigt = [a.info[REF_STRESS].copy() for a in frames]
    frames[2].info[REF_STRESS] = voigt_6_to_full_3x3_stress(frames[2].info[REF_STRESS])  # (3, 3) in, Voigt out
    frames[3].calc = SinglePointCalculator(frames[3], energy=123.0)  # must not leak into the file
    for i, a in enumerate(frames):
        a.info.update({ITERATION: 3, WALKER: i, STEP: 10 * i, LABELLER: "emt", STATUS: "labelled",
                       TIMESTAMP: "2024-05-01T12:00:00+00:00"})
    ds = Dataset(tmp_path / "ds")
    assert ds.append(frames, source="rattle") == 4
    back = Dataset(tmp_path / "ds").frames()  # a fresh reader: everything comes from disk
    assert len(back) == 4
    for a, b, stress in zip(frames, back, voigt):
        assert b.calc is None
        assert b.info[REF_ENERGY] == a.info[REF_ENERGY]
        np.testing.assert_allclose(b.arrays[REF_FORCES], a.arrays[REF_FORCES], rtol=0, atol=5e-9)
        assert b.info[REF_STRESS].shape == (6,)
        np.testing.assert_allclose(b.info[REF_STRESS], stress, rtol=0, atol=1e-15)
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=5e-9)
        np.testing.assert_array_equal(b.numbers, a.numbers)
        np.testing.assert_array_equal(b.cell[:], a.cell[:])
        np.testing.assert_array_equal(b.pbc, a.pbc)
        for key in (ITERATION, WALKER, STEP, LABELLER, STATUS, TIMESTAMP):
            assert b.info[key] == a.info[key]
        assert b.info[SOURCE] == "rattle"
        assert b.info[FRAME_HASH] == frame_hash(a) == frame_hash(b)
    # the in-memory view of the writer equals what a reader sees
    for a, b in zip(ds.frames(), back):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.arrays[REF_FORCES], b.arrays[REF_FORCES])
    # the shard is plain extxyz with REF_* keys only (what mace-torch reads), no calculator keys
    (shard,) = shard_files(ds)
    header = (ds.shard_dir / shard).read_text().splitlines()[1]
    assert "REF_energy=" in header and "REF_forces:R:3" in header and "REF_stress=" in header
    assert " energy=" not in header and "forces:R:3:" not in header.replace("REF_forces:R:3", "")
    raw = ase.io.read(ds.shard_dir / shard, ":", format="extxyz")
    assert all(a.calc is None for a in raw)
    out = tmp_path / "all.extxyz"
    assert ds.export_extxyz(out) == 4
    exported = ase.io.read(out, ":")
    assert [a.info[REF_ENERGY] for a in exported] == [a.info[REF_ENERGY] for a in frames]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


def test_dedup_within_batch_across_appends_and_objects(tmp_path):
    frames = emt_frames(6)
    ds = Dataset(tmp_path / "ds")
    assert ds.append(frames[:3] + frames[:3]) == 3  # duplicates inside a batch
    assert ds.append(frames[:3]) == 0  # already stored: nothing written
    assert len(shard_files(ds)) == 1
    other = Dataset(tmp_path / "ds")  # second object on the same directory
    assert other.append(frames[1:5]) == 2
    assert len(ds) == 5 and ds.append(frames) == 1  # ds sees other's shard before deduplicating
    assert len(other) == 6
    assert ds.hashes == other.hashes == {frame_hash(a) for a in frames}
    # a copied shard (as left by two racing writers) is deduplicated by readers
    first = shard_files(ds)[0]
    shutil.copy(ds.shard_dir / first, ds.shard_dir / f"{99999999999999999999:020d}-deadbeef.extxyz")
    again = Dataset(tmp_path / "ds").frames()
    assert len(again) == 6 and len({a.info[FRAME_HASH] for a in again}) == 6
    # translated copies are different frames; hashes do not wrap positions
    moved = frames[0].copy()
    moved.positions += 0.5
    assert frame_hash(moved) != frame_hash(frames[0])


def test_compact_keeps_order_and_interrupted_compaction_is_harmless(tmp_path):
    ds = Dataset(tmp_path / "ds")
    batches = [emt_frames(2, seed=s) for s in range(3)]
    for b in batches:
        ds.append(b)
    order = [a.info[FRAME_HASH] for a in ds.frames()]
    assert len(shard_files(ds)) == 3
    # interrupted compaction: the merged shard is in place but the old shards were not deleted yet
    old = shard_files(ds)
    merged = ds._new_shard_name(ts=int(old[0][:20]) - 1)
    ase.io.write(ds.shard_dir / merged, ds.frames(), format="extxyz")
    fresh = Dataset(tmp_path / "ds")
    assert [a.info[FRAME_HASH] for a in fresh.frames()] == order
    assert fresh.compact() == 4
    assert len(shard_files(fresh)) == 1
    assert [a.info[FRAME_HASH] for a in Dataset(tmp_path / "ds").frames()] == order
    assert fresh.compact() == 0
    assert fresh.append(emt_frames(1, seed=9)) == 1 and len(Dataset(tmp_path / "ds")) == 7


def test_stray_tmp_files_are_ignored_and_old_ones_cleaned(tmp_path):
    ds = Dataset(tmp_path / "ds")
    ds.append(emt_frames(2))
    (shard,) = shard_files(ds)
    text = (ds.shard_dir / shard).read_text()
    stale = ds.shard_dir / f"{TMP_PREFIX}dead-1.extxyz"
    fresh = ds.shard_dir / f"{TMP_PREFIX}live-2.extxyz"
    stale.write_text(text[: len(text) // 2])  # a half-written shard from a killed writer
    fresh.write_text(text[: len(text) // 3])
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert len(Dataset(tmp_path / "ds")) == 2
    assert ds.append(emt_frames(1, seed=5)) == 1
    assert not stale.exists() and fresh.exists()  # a recent tmp may belong to a live writer
    assert len(Dataset(tmp_path / "ds")) == 3


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from alflow.data import Dataset
    ds = Dataset(sys.argv[1])
    base = []
    for i in range(3):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((4, 4, 4))
        a.rattle(0.05, seed=i)
        a.calc = EMT()
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        a.info["REF_stress"] = a.get_stress()
        a.calc = None
        base.append(a)
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", flush=True)
    k = 0
    while True:
        batch = [a.copy() for a in base]  # the same frames from every writer: racing duplicates
        for a in base:
            for _ in range(4):  # rigid translations keep the EMT labels exact
                b = a.copy()
                b.positions += rng.uniform(-2.0, 2.0, 3)
                batch.append(b)
        ds.append(batch, source="child")
        k += 1
        if k % 6 == 0:
            ds.compact()
    """
)


def test_sigkilled_concurrent_writers_leave_a_clean_dataset(tmp_path):
    path = tmp_path / "ds"
    rng = random.Random(1234)
    leftovers = 0
    for round_ in range(3):
        procs = [
            subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(100 * round_ + j)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for j in range(2)
        ]
        for p in procs:
            line = p.stdout.readline()
            assert line.strip() == "ready", p.stderr.read()
        for p in procs:
            time.sleep(rng.uniform(0.1, 0.8))
            assert p.poll() is None, p.stderr.read()
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
            assert p.returncode == -signal.SIGKILL
            p.stdout.close()
            p.stderr.close()
        leftovers += sum(n.startswith(TMP_PREFIX) for n in os.listdir(path / "shards"))
    ds = Dataset(path)
    frames = ds.frames()
    hashes = [a.info[FRAME_HASH] for a in frames]
    assert len(frames) >= 3 and len(set(hashes)) == len(frames)
    assert len({a.positions.tobytes() for a in frames}) == len(frames)
    for i, a in enumerate(frames):
        validate_frame(a, f"frame {i}")
        assert len(a) == 256 and a.info[SOURCE] == "child" and a.info[FRAME_HASH] == frame_hash(a)
    for a in random.Random(0).sample(frames, 4):  # stored labels belong to the stored positions
        ref = a.copy()
        ref.calc = EMT()
        np.testing.assert_allclose(a.arrays[REF_FORCES], ref.get_forces(), atol=1e-6)
        assert abs(a.info[REF_ENERGY] - ref.get_potential_energy()) < 1e-6
    print(f"{len(frames)} frames, {leftovers} stray tmp file(s) seen after kills")


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda a: a.info.pop(REF_ENERGY), "missing info['REF_energy']; expected the total energy in eV"),
        (lambda a: a.arrays.pop(REF_FORCES), "missing arrays['REF_forces']; expected forces in eV/Å"),
        (lambda a: a.info.__setitem__(REF_ENERGY, float("nan")), "expected one finite number (eV)"),
        (lambda a: a.info.__setitem__(REF_ENERGY, [1.0, 2.0]), "expected one finite number (eV)"),
        (lambda a: a.arrays[REF_FORCES].__setitem__((3, 1), np.inf), "contains NaN/inf; expected finite forces"),
        (lambda a: a.positions.__setitem__((0, 0), np.nan), "positions contain NaN/inf"),
        (lambda a: a.info.__setitem__(REF_STRESS, np.zeros(5)), "expected Voigt (6,) or (3, 3)"),
        (lambda a: a.numbers.__setitem__(0, 0), "unknown element (atomic number 0); expected atomic numbers 1..118"),
        (lambda a: a.numbers.__setitem__(0, 8), "element(s) O not in the dataset's species [Cu, Au]"),
    ],
)
def test_bad_frame_rejects_the_whole_batch_with_a_precise_message(tmp_path, spoil, expected):
    ds = Dataset(tmp_path / "ds", species=["Cu", 79])
    ds.append(emt_frames(1, seed=7))
    batch = emt_frames(3)
    spoil(batch[1])
    with pytest.raises(DatasetError) as err:
        ds.append(batch)
    assert "frame 1" in str(err.value) and str(tmp_path / "ds") in str(err.value)
    assert expected in str(err.value)
    assert len(Dataset(tmp_path / "ds")) == 1 and len(shard_files(ds)) == 1  # nothing written, nothing lost


def test_wrong_force_shape_is_named(tmp_path):
    a = emt_frames(1)[0]
    a.arrays[REF_FORCES] = a.arrays[REF_FORCES][:, :2]
    with pytest.raises(DatasetError, match=r"here: arrays\['REF_forces'\] has shape \(32, 2\); expected \(32, 3\)"):
        validate_frame(a, "here")


# -- import --------------------------------------------------------------------------------------------
def test_import_validation_names_file_and_frame(tmp_path):
    frames = emt_frames(3)
    frames[2].arrays[REF_FORCES][0, 0] = np.nan
    bad = tmp_path / "bad.extxyz"
    ase.io.write(bad, frames, format="extxyz")
    ds = Dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"bad\.extxyz, frame 2: arrays\['REF_forces'\] contains NaN/inf"):
        ds.import_file(bad)
    assert len(ds) == 0
    with pytest.raises(FileNotFoundError, match="missing.xyz"):
        read_frames(tmp_path / "missing.xyz")
    junk = tmp_path / "junk.dat"
    junk.write_text("this is not a structure\n")
    with pytest.raises(DatasetError, match=r"junk\.dat: cannot read"):
        read_frames(junk)


def test_import_poscar_is_unlabelled(tmp_path):
    atoms = emt_frames(1)[0]
    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, atoms, format="vasp")
    (got,) = read_frames(poscar)
    assert REF_ENERGY not in got.info and got.calc is None
    np.testing.assert_allclose(got.positions, atoms.positions, atol=1e-6)
    np.testing.assert_allclose(got.cell[:], atoms.cell[:], atol=1e-6)
    with pytest.raises(DatasetError, match=r"POSCAR, frame 0: no energy/forces labels"):
        Dataset(tmp_path / "ds").import_file(poscar)


def test_import_ase_db_and_calculator_keys_become_ref_labels(tmp_path):
    frames = emt_frames(3)
    db = tmp_path / "labels.db"
    with connect(db) as con:
        for a in frames:
            b = a.copy()
            b.calc = SinglePointCalculator(b, energy=a.info[REF_ENERGY], forces=a.arrays[REF_FORCES],
                                           stress=a.info[REF_STRESS])
            con.write(b)
    ds = Dataset(tmp_path / "ds")
    assert ds.import_file(db, labeller="emt") == 3
    assert ds.import_file(db) == 0
    for a, b in zip(frames, ds.frames()):
        assert b.info[REF_ENERGY] == pytest.approx(a.info[REF_ENERGY], abs=1e-12)
        np.testing.assert_allclose(b.arrays[REF_FORCES], a.arrays[REF_FORCES], atol=5e-9)
        np.testing.assert_allclose(b.info[REF_STRESS], a.info[REF_STRESS], atol=1e-15)
        assert b.info[SOURCE] == "file" and b.info[LABELLER] == "emt"
    # extxyz with plain energy/forces/stress keys (ASE writes calculator results so)
    plain = tmp_path / "plain.extxyz"
    calc_frames = []
    for a in frames:
        b = a.copy()
        del b.info[REF_ENERGY], b.info[REF_STRESS], b.arrays[REF_FORCES]
        b.calc = SinglePointCalculator(b, energy=a.info[REF_ENERGY], forces=a.arrays[REF_FORCES],
                                       stress=a.info[REF_STRESS])
        calc_frames.append(b)
    ase.io.write(plain, calc_frames, format="extxyz")
    got = read_frames(plain)
    assert [g.info[REF_ENERGY] for g in got] == pytest.approx([a.info[REF_ENERGY] for a in frames])
    assert all(g.calc is None and g.info[REF_STRESS].shape == (6,) for g in got)


@pytest.mark.parametrize("name", ["OUTCAR_example_1", "vasprun_pstress.xml"])
def test_import_vasp_outputs(tmp_path, name):
    src = ASE_VASP_DATA / name
    if not src.is_file():
        pytest.skip(f"ASE test data {src} not installed")
    dst = tmp_path / ("OUTCAR" if "OUTCAR" in name else "vasprun.xml")
    shutil.copy(src, dst)
    ref = ase.io.read(dst)
    (got,) = read_frames(dst, index=-1)
    assert got.info[REF_ENERGY] == pytest.approx(ref.get_potential_energy())
    np.testing.assert_allclose(got.arrays[REF_FORCES], ref.get_forces())
    np.testing.assert_allclose(got.info[REF_STRESS], ref.get_stress())
    ds = Dataset(tmp_path / "ds")
    assert ds.import_file(dst, source="vasp") >= 1
    assert all(a.info[SOURCE] == "vasp" for a in ds.frames())


def test_import_cif_and_pymatgen_fallback(tmp_path):
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(3.6), ["Cu", "Au", "Cu", "Cu"],
                  [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cif = tmp_path / "cu3au.cif"
    s.to(filename=str(cif))
    (a,) = read_frames(cif)
    assert a.get_chemical_formula() == "AuCu3"
    np.testing.assert_allclose(a.cell.lengths(), [3.6] * 3, atol=1e-6)
    pmg_json = tmp_path / "cu3au.json"  # pymatgen's own format: ASE cannot read it
    s.to(filename=str(pmg_json))
    with pytest.raises(Exception):
        ase.io.read(pmg_json)
    (b,) = read_frames(pmg_json)
    assert b.get_chemical_formula() == "AuCu3" and REF_ENERGY not in b.info
    np.testing.assert_allclose(b.get_scaled_positions(), s.frac_coords, atol=1e-9)


# -- splits, E0, summary -----------------------------------------------------------------------------
def test_split_reproducible_disjoint_and_small_n():
    for n in (2, 3, 7, 10, 101):
        tr, va, te = split(n, seed=3)
        again = split(n, seed=3)
        assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), again))
        both = np.concatenate([tr, va, te])
        assert sorted(both.tolist()) == list(range(n))  # every frame in exactly one split
        assert len(va) >= 1 and len(tr) >= 1
    assert [len(x) for x in split(10)] == [8, 1, 1]
    assert [len(x) for x in split(2)] == [1, 1, 0]
    assert [len(x) for x in split(1)] == [1, 0, 0]
    assert not all(np.array_equal(x, y) for x, y in zip(split(101, seed=0), split(101, seed=1)))
    frames = emt_frames(5)
    assert all(np.array_equal(x, y) for x, y in zip(split(frames, seed=2), split(5, seed=2)))
    with pytest.raises(DatasetError, match="empty"):
        split(0)
    with pytest.raises(ValueError, match="fractions"):
        split(10, fractions=(0.5, 0.1, 0.1))


def test_fit_e0_recovers_known_energies():
    e = {29: -3.71, 79: -4.25, 8: -1.5}
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        counts = rng.integers(0, 6, size=3)
        counts[0] += 1
        numbers = np.repeat([29, 79, 8], counts)
        a = Atoms(numbers=numbers, positions=rng.uniform(0, 5, (len(numbers), 3)))
        a.info[REF_ENERGY] = float(sum(e[int(z)] for z in numbers))
        frames.append(a)
    got = fit_e0(frames)
    assert set(got) == set(e)
    for z, ez in e.items():
        assert got[z] == pytest.approx(ez, abs=1e-10)
    fixed_ratio = [Atoms("CuAu"), Atoms("Cu2Au2")]
    for a, en in zip(fixed_ratio, (-8.0, -16.0)):
        a.info[REF_ENERGY] = en
    with pytest.warns(UserWarning, match="minimum-norm"):
        fit_e0(fixed_ratio)


def test_summary_counts_and_text(tmp_path):
    frames = emt_frames(3) + emt_frames(2, reps=3, stress=False, seed=1) + emt_frames(2, gold=8, seed=2)
    ds = Dataset(tmp_path / "ds")
    ds.append(frames)
    s = ds.summary()
    assert s["n_frames"] == 7 and s["n_labelled"] == 7 and s["n_with_stress"] == 5
    assert s["n_atoms_min"] == 32 and s["n_atoms_max"] == 108
    assert s["elements"] == ["Cu", "Au"]
    assert s["compositions"] == {"Cu": 5, "AuCu3": 2}
    epa = [a.info[REF_ENERGY] / len(a) for a in frames]
    assert s["energy_per_atom_min"] == pytest.approx(min(epa)) and s["energy_per_atom_max"] == pytest.approx(max(epa))
    fmax = max(np.linalg.norm(a.arrays[REF_FORCES], axis=1).max() for a in frames)
    assert s["max_abs_force"] == pytest.approx(fmax, abs=1e-7)
    text = format_summary(s, title="ds")
    assert "frames            7 (7 labelled, 5 with stress)" in text and "AuCu3" in text
    assert summary([])["n_frames"] == 0 and "frames            0" in format_summary(summary([]))


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_import_summary_export_e0_split_compact(tmp_path, capsys):
    src = tmp_path / "labelled.extxyz"
    ase.io.write(src, emt_frames(6) + emt_frames(2, gold=8, seed=3), format="extxyz")
    ds = tmp_path / "ds"
    assert main(["data", "import", str(ds), str(src), "--source", "seed"]) == 0
    assert main(["data", "import", str(ds), str(src)]) == 0
    out = capsys.readouterr().out
    assert "8 new frame(s)" in out and "0 new frame(s)" in out
    assert main(["data", "summary", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "frames            8 (8 labelled, 8 with stress)" in out and "Cu" in out
    assert main(["data", "summary", str(src)]) == 0 and "frames            8" in capsys.readouterr().out
    exported = tmp_path / "train_all.extxyz"
    assert main(["data", "export", str(ds), str(exported)]) == 0
    assert len(ase.io.read(exported, ":")) == 8
    assert main(["data", "e0", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "Cu" in out and "Au" in out
    assert main(["data", "split", str(ds), "--out", str(tmp_path / "splits")]) == 0
    sizes = [len(ase.io.read(tmp_path / "splits" / f"{n}.extxyz", ":")) for n in ("train", "valid", "test")]
    assert sum(sizes) == 8 and sizes[1] >= 1
    assert main(["data", "compact", str(ds)]) == 0
    assert Dataset(ds).frames()[0].info[SOURCE] == "seed"


def test_cli_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    assert main(["data", "summary", str(tmp_path / "nothing.extxyz")]) == 2
    assert "nothing.extxyz" in capsys.readouterr().err
    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, bulk("Cu"), format="vasp")
    assert main(["data", "import", str(tmp_path / "ds"), str(poscar)]) == 2
    err = capsys.readouterr().err
    assert str(poscar) in err and "no energy/forces labels" in err
    junk = tmp_path / "junk.dat"
    junk.write_text("garbage\n")
    assert main(["data", "e0", str(junk)]) == 2
    assert "junk.dat" in capsys.readouterr().err
    assert main(["data", "export", str(tmp_path / "not_a_dataset"), str(tmp_path / "o.extxyz")]) == 2
    assert "not_a_dataset" in capsys.readouterr().err
    assert not (tmp_path / "not_a_dataset").exists()


def test_stable_split_keeps_every_frame_in_its_part_as_the_dataset_grows():
    from alflow.data import stable_split

    frames = emt_frames(60, stress=False)
    parts_before = None
    for n in (6, 20, 40, 60):
        train, valid, test = stable_split(frames[:n], (0.7, 0.2, 0.1), seed=3)
        assert sorted([*train, *valid, *test]) == list(range(n)) and len(valid) >= 1 and len(train) >= 1
        part = {k: p for p, idx in enumerate((train, valid, test)) for k in idx}
        if parts_before is not None:  # no frame moves (the fallbacks for tiny sets are not needed from 20 on)
            assert all(part[k] == p for k, p in parts_before.items())
        parts_before = part if n >= 20 else None
    assert 4 <= len(valid) <= 22 and len(test) <= 14  # 60 frames: 12 and 6 expected
    assert stable_split(frames[::-1], (0.7, 0.2, 0.1), seed=3)[1].size == len(valid)  # order does not matter
    other = stable_split(frames, (0.7, 0.2, 0.1), seed=4)[1]
    assert set(other) != set(valid)  # the seed picks another split


# -- hardening (issue 16, item 10): structures training rejects, conflicts, removal ----------------------
def _flat(a: Atoms) -> None:
    a.cell[2] = a.cell[0] + a.cell[1]  # linearly dependent: zero volume


def _squashed(a: Atoms) -> None:
    a.set_cell(np.diag([a.cell[0, 0], a.cell[1, 1], 0.05]), scale_atoms=False)  # 0.05 Å thick


def _coincident(a: Atoms) -> None:
    a.positions[5] = a.positions[4] + [0.03, 0.0, 0.0]


def _through_the_boundary(a: Atoms) -> None:  # atom 0 and the image of atom 5 are 0.04 Å apart
    a.positions[0] = [0.01, 1.0, 1.0]
    a.positions[5] = [a.cell[0, 0] - 0.03, 1.0, 1.0]


def _far_away(a: Atoms) -> None:
    a.positions[3] = [1e12, 0.0, 0.0]


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_flat, "flat or zero-volume cell"),
        (_squashed, "0.05 Å thick along a periodic direction"),
        (_coincident, "atoms 4 (Cu) and 5 (Cu) are 0.03 Å apart"),
        (_through_the_boundary, "atoms 0 (Cu) and 5 (Cu) are 0.04 Å apart (periodic images included)"),
        (_far_away, "atom 3 is at [1000000000000.0, 0.0, 0.0] Å; expected |coordinates| <= 100000 Å"),
    ],
)
def test_structures_training_cannot_use_are_rejected_at_the_door_naming_file_and_frame(tmp_path, spoil, expected):
    frames = emt_frames(3)
    spoil(frames[2])
    src = tmp_path / "in.extxyz"
    ase.io.write(src, frames, format="extxyz")
    ds = Dataset(tmp_path / "ds")
    with pytest.raises(DatasetError) as err:
        ds.import_file(src)
    assert f"{src}, frame 2: " in str(err.value) and expected in str(err.value)
    assert len(Dataset(tmp_path / "ds")) == 0  # nothing written
    with pytest.raises(DatasetError, match="frame 2 of the batch"):
        ds.append(frames)


def test_molecules_and_slabs_pass_the_structure_checks(tmp_path):
    from ase.build import fcc111, molecule

    water = molecule("H2O")  # no cell
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    slab.pbc = (True, True, False)
    frames = []
    for atoms in (water, slab):
        atoms.calc = EMT() if atoms is slab else None
        if atoms is water:
            atoms.info[REF_ENERGY] = -14.0
            atoms.arrays[REF_FORCES] = np.zeros((3, 3))
        else:
            atoms.info[REF_ENERGY] = atoms.get_potential_energy()
            atoms.arrays[REF_FORCES] = atoms.get_forces()
            atoms.calc = None
        frames.append(atoms)
    assert Dataset(tmp_path / "ds").append(frames) == 2


def test_reimporting_structures_with_other_labels_reports_the_conflicts(tmp_path, capsys):
    frames = emt_frames(4)
    first = tmp_path / "first.extxyz"
    ase.io.write(first, frames, format="extxyz")
    for a in frames[1:3]:  # the same structures, relabelled (another functional, say)
        a.info[REF_ENERGY] += 0.25
    second = tmp_path / "second.extxyz"
    ase.io.write(second, frames, format="extxyz")
    ds = Dataset(tmp_path / "ds")
    assert ds.import_file(first) == 4
    report = ds.import_report(second)
    assert (report.n_new, report.n_same, len(report.conflicts)) == (0, 2, 2)
    assert [c.where for c in report.conflicts] == [f"{second}, frame 1", f"{second}, frame 2"]
    assert [c.index for c in report.conflicts] == [1, 2] and all(c.d_energy == pytest.approx(0.25) for c in
                                                                  report.conflicts)
    stored = Dataset(tmp_path / "ds").frames()
    assert stored[1].info[REF_ENERGY] == pytest.approx(frames[1].info[REF_ENERGY] - 0.25)  # first wins
    assert main(["data", "import", str(tmp_path / "ds"), str(second)]) == 1
    out, err = capsys.readouterr()
    assert "0 new frame(s), 2 already stored with the same labels, 2 conflict(s)" in out
    assert f"conflict: {second}, frame 1 (hash {frame_hash(frames[1])[:12]})" in out and "0.25 eV" in out
    assert "2 frame(s) not imported" in err


def test_remove_frames_by_index_hash_and_condition(tmp_path, capsys):
    frames = emt_frames(6)
    ds = Dataset(tmp_path / "ds")
    for k in range(3):  # three shards
        ds.append(frames[2 * k : 2 * k + 2], source=f"s{k}")
    hashes = [a.info[FRAME_HASH] for a in ds.frames()]
    removed = ds.remove(indices=[1], hashes=[hashes[4][:10]])
    assert [a.info[FRAME_HASH] for a in removed] == [hashes[1], hashes[4]]
    fresh = Dataset(tmp_path / "ds")
    assert [a.info[FRAME_HASH] for a in fresh.frames()] == [hashes[i] for i in (0, 2, 3, 5)]  # order kept
    assert not (tmp_path / "ds" / "removing.json").exists()
    with pytest.raises(DatasetError, match="no frame 9"):
        fresh.remove(indices=[9])
    with pytest.raises(DatasetError, match="too short"):
        fresh.remove(hashes=["ab"])
    # the CLI: a dry run lists and removes nothing; --where selects; all must hold
    d = str(tmp_path / "ds")
    assert main(["data", "remove", d, "--where", "source=s1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 of 4" in out and hashes[2][:12] in out and len(Dataset(d)) == 4
    assert main(["data", "remove", d, "--where", "source=s1", "--where", f"hash={hashes[3][:8]}"]) == 0
    assert "removed 1 frame(s), 3 left" in capsys.readouterr().out
    assert [a.info[FRAME_HASH] for a in Dataset(d).frames()] == [hashes[i] for i in (0, 2, 5)]
    fmax = max(np.linalg.norm(Dataset(d).frames()[i].arrays[REF_FORCES], axis=1).max() for i in range(3))
    assert main(["data", "remove", d, "--where", f"max_force>{fmax + 1}"]) == 0 and len(Dataset(d)) == 3
    assert main(["data", "list", d, "--where", "nonsense>1"]) == 2
    assert "no frame has 'nonsense'" in capsys.readouterr().err
    assert main(["data", "remove", d]) == 2  # nothing named: refuses
    assert main(["data", "remove", d, "--index", "0", "1", "2"]) == 0 and len(Dataset(d)) == 0


class _Killed(BaseException):
    """Stands in for a SIGKILL at one step of a removal (raised from a real step, after it happened)."""


@pytest.mark.parametrize("step", ["journal", "merged", "deleted"])
def test_an_interrupted_removal_is_all_or_nothing_and_finished_by_the_next_writer(tmp_path, monkeypatch, step):
    import alflow.data as data_module

    frames = emt_frames(5)
    ds = Dataset(tmp_path / "ds")
    ds.append(frames[:3])
    ds.append(frames[3:])
    hashes = [a.info[FRAME_HASH] for a in ds.frames()]
    real_fsync, real_write = data_module.fsync_dir, data_module.write_extxyz_atomic
    calls = {"fsync": 0}

    def fsync_then_die(path):  # 1st call: the journal is durable; 2nd: the old shards are deleted
        real_fsync(path)
        calls["fsync"] += 1
        if (step == "journal" and calls["fsync"] == 1) or (step == "deleted" and calls["fsync"] == 2):
            raise _Killed

    def write_then_die(frames_, path):  # the merged shard is written, the old ones are still there
        n = real_write(frames_, path)
        if step == "merged":
            raise _Killed
        return n

    monkeypatch.setattr(data_module, "fsync_dir", fsync_then_die)
    monkeypatch.setattr(data_module, "write_extxyz_atomic", write_then_die)
    with pytest.raises(_Killed):
        ds.remove(indices=[1, 3])
    monkeypatch.undo()
    assert (tmp_path / "ds" / "removing.json").exists()
    reader = Dataset(tmp_path / "ds")  # a reader after the "kill" sees the removal done, in order
    assert [a.info[FRAME_HASH] for a in reader.frames()] == [hashes[i] for i in (0, 2, 4)]
    assert reader.compact() >= 0  # the next writer finishes the removal
    assert not (tmp_path / "ds" / "removing.json").exists()
    again = Dataset(tmp_path / "ds")
    assert [a.info[FRAME_HASH] for a in again.frames()] == [hashes[i] for i in (0, 2, 4)]
    assert again.append(frames[1]) == 1 and len(Dataset(tmp_path / "ds")) == 4  # a removed frame can come back
