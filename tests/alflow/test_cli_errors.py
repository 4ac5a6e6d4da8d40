"""Ordinary mistakes end in one clear message naming the thing and exit code 2, never a traceback.

Item 15 of the hardening issue: every ``alflow`` subcommand on a missing file, an unusable device,
an output directory that is not there, a full disk, a corrupt ``state.json``, a missing DFT
executable. Item 14: ``alflow validate`` and the start of ``alflow run`` catch what can be caught
before the first oracle call (``alflow.preflight``), so a bad configuration costs no label.

The commands run in this process through ``alflow.cli.main`` (the same code path as the
``alflow`` script: its exit code and what it prints), with real files, real models and
real devices; nothing is mocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ase.io
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

import potentials
from alflow.cli import main
from alflow.keys import MAX_FORCE_DEVIATION
from potentials.committee import Committee

HPARAMS = "{n_atom_basis: 8, n_filters: 8, n_interactions: 1, n_rbf: 8}"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def config_text(run_dir: Path, extra: str = "", hparams: str = HPARAMS, system: str | None = None) -> str:
    system = system or "  build: {element: Cu, crystal: fcc, a: 3.61, cubic: true}\n  initial_rattle: {n_frames: 2}\n"
    return (f"name: t\nrun_dir: {run_dir}\nsystem:\n{system}"
            f"potential: {{architecture: schnet, cutoff: 3.0, hparams: {hparams}}}\n"
            "committee: {size: 2, calibrate: false}\ntraining: {epochs: 1}\n"
            "exploration: {walkers: [{steps: 10, stride: 5}]}\nloop: {max_iterations: 1}\n"
            "execution: {device: cpu}\n" + extra)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A labelled extxyz, a committee model file, a scored trajectory and a good config."""
    root = tmp_path_factory.mktemp("cli_errors")
    frames = []
    for k in range(3):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    ase.io.write(root / "labelled.extxyz", frames)
    committee = Committee.build("schnet", 2, [29], 3.0, seed=0, n_atom_basis=8, n_filters=8, n_interactions=1, n_rbf=8)
    potentials.save(committee, root / "committee.pt")
    scored = []
    for k, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.info[MAX_FORCE_DEVIATION] = 0.1 * (k + 1)
        scored.append(atoms)
    ase.io.write(root / "walker-0.extxyz", scored)
    (root / "good.yaml").write_text(config_text(root / "runs" / "good"))
    (root / "a_file").write_text("not a directory\n")
    return {"root": root, "labelled": root / "labelled.extxyz", "model": root / "committee.pt",
            "traj": root / "walker-0.extxyz", "config": root / "good.yaml", "a_file": root / "a_file"}


def corrupt_run_dir(root: Path) -> Path:
    run_dir = root / "corrupt_run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "state.json").write_text('{"stages": {"initial": ')  # truncated by hand
    (root / "corrupt.yaml").write_text(config_text(run_dir))
    return run_dir


# (id, argv with {placeholders}, words the message must contain, marks)
MISTAKES = [
    ("md-missing-model", ["md", "{config}", "--model", "{root}/nope.pt"], ["nope.pt"], ()),
    ("md-cuda-without-cuda", ["md", "{config}", "--model", "{model}", "--device", "cuda"], ["--device", "CUDA"], (NO_CUDA,)),
    ("md-unknown-device", ["md", "{config}", "--model", "{model}", "--device", "tpu"], ["tpu", "cpu, cuda"], ()),
    ("md-out-is-a-file", ["md", "{config}", "--model", "{model}", "--out", "{a_file}"], ["a_file", "not a directory"], ()),
    ("train-cuda-without-cuda", ["train", "{config}", "--data", "{labelled}", "--device", "cuda", "--quiet"], ["CUDA"], (NO_CUDA,)),
    ("train-bad-device-index", ["train", "{config}", "--data", "{labelled}", "--device", "cuda:abc", "--quiet"], ["cuda:abc"], ()),
    ("train-missing-data", ["train", "{config}", "--data", "{root}/missing.extxyz", "--quiet"], ["missing.extxyz"], ()),
    ("ipi-driver-cuda", ["ipi-driver", "--model", "{model}", "--structure", "{labelled}", "--unix", "x", "--device",
                         "cuda", "--timeout", "1"], ["CUDA"], (NO_CUDA,)),
    ("ipi-driver-unknown-device", ["ipi-driver", "--model", "{model}", "--structure", "{labelled}", "--unix", "x",
                                   "--device", "tpu"], ["--device", "tpu"], ()),
    ("ipi-driver-missing-model", ["ipi-driver", "--model", "{root}/gone.pt", "--structure", "{labelled}", "--unix", "x",
                                  "--timeout", "1"], ["gone.pt"], ()),
    ("select-out-missing-dir", ["select", "{traj}", "--out", "{root}/no_such_dir/selected.extxyz"], ["no_such_dir", "--out"], ()),
    ("select-negative-seed", ["select", "{traj}", "--out", "{root}/sel.extxyz", "--seed", "-1"], ["--seed", ">= 0"], ()),
    ("select-missing-trajectory", ["select", "{root}/walker-9.extxyz", "--out", "{root}/sel.extxyz"], ["walker-9.extxyz"], ()),
    ("schema-full-disk", ["schema", "-o", "/dev/full"], ["/dev/full", "No space left"],
     (pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full"),)),
    ("report-corrupt-state", ["report", "{root}/corrupt_run"], ["state.json"], ()),
    ("report-not-a-run-dir", ["report", "{a_file}"], ["a_file", "state.json"], ()),
    ("train-data-not-a-dataset", ["train", "{config}", "--data", "{root}", "--quiet"], ["no dataset"], ()),
    ("run-corrupt-state", ["run", "{root}/corrupt.yaml", "--no-prefect"], ["state.json"], ()),
    ("label-missing-cp2k", ["label", "{labelled}", "--dataset", "{root}/ds_cp2k", "--oracle", "cp2k", "--no-progress"],
     ["cp2k_shell", "PATH"], (pytest.mark.skipif(shutil.which("cp2k_shell") is not None, reason="cp2k is installed"),)),
    ("label-bad-param", ["label", "{labelled}", "--dataset", "{root}/ds_p", "--param", "noequals"], ["--param", "noequals"], ()),
    ("validate-missing-config", ["validate", "{root}/nope.yaml"], ["nope.yaml"], ()),
    ("data-summary-missing", ["data", "summary", "{root}/nothing.extxyz"], ["nothing.extxyz"], ()),
]


@pytest.mark.parametrize("argv, words", [pytest.param(a, w, id=i, marks=m) for i, a, w, m in MISTAKES])
def test_an_ordinary_mistake_is_one_message_and_exit_2(files: dict[str, Path], capfd: pytest.CaptureFixture[str],
                                                       argv: list[str], words: list[str]) -> None:
    corrupt_run_dir(files["root"])
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors exit 2 with a usage line
        code = exit_.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "AssertionError" not in err, err
    for word in words:
        assert word in err, (word, err)


# --------------------------------------------------------------------------- item 14: before spending
def _bad_configs(files: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    root = files["root"]
    run = root / "runs"
    unlabelled = root / "unlabelled.extxyz"
    ase.io.write(unlabelled, [bulk("Cu", "fcc", a=3.61, cubic=True)])
    other = root / "other_model.pt"
    if not other.exists():
        potentials.save(Committee.build("schnet", 2, [29], 3.5, seed=0, n_atom_basis=8, n_filters=8, n_interactions=1,
                                        n_rbf=8), other)
    return [
        ("unknown-hparam", config_text(run / "a", hparams="{n_atom_basis: 8, bogus: 3}"), ["potential.hparams", "bogus"]),
        ("hparam-bad-value", config_text(run / "b", hparams="{n_atom_basis: -4}"), ["potential.hparams", "n_atom_basis"]),
        ("hparam-nan", config_text(run / "c", hparams="{n_atom_basis: 8, n_rbf: .nan}"), ["potential.hparams.n_rbf", "finite"]),
        ("missing-structure", config_text(run / "d", system=f"  structures: [{root}/no_cu.cif]\n"),
         ["system.structures", "no_cu.cif"]),
        ("missing-initial-dataset", config_text(
            run / "e", system=f"  build: {{element: Cu}}\n  initial_dataset: {root}/no_data.extxyz\n"),
         ["system.initial_dataset", "no_data.extxyz"]),
        ("unlabelled-initial-dataset", config_text(
            run / "f", system=f"  build: {{element: Cu}}\n  initial_dataset: {unlabelled}\n"),
         ["system.initial_dataset", "unlabelled.extxyz"]),
        ("missing-checkpoint", config_text(run / "g").replace("hparams:", f"checkpoint: {root}/no_model.pt, hparams:"),
         ["potential.checkpoint", "no_model.pt"]),
        ("checkpoint-mismatch", config_text(run / "h").replace("hparams:", f"checkpoint: {other}, hparams:"),
         ["potential.checkpoint", "cutoff"]),
        ("negative-seed", config_text(run / "i") + "seed: -1\n", ["seed"]),
        ("negative-walker-seed", config_text(run / "j").replace("stride: 5}", "stride: 5, seed: -3}"), ["seed"]),
        ("run-dir-is-a-file", config_text(files["a_file"]), ["run_dir", "not a directory"]),
        ("one-initial-frame", config_text(run / "l").replace("n_frames: 2", "n_frames: 1"),
         ["system", "at least 2", "initial_rattle.n_frames"]),
        ("vacancy-in-a-one-atom-cell", config_text(
            run / "m", system="  build: {element: Cu}\n  initial_rattle: {n_frames: 2}\n").replace(
            "stride: 5}", "stride: 5, start: vacancy}"), ["exploration.walkers.0.start", "no atoms"]),
        ("oracle-not-installed", config_text(run / "k") + "labelling: {oracle: no_such_pkg.calc:Calc}\n",
         ["labelling.oracle", "no_such_pkg"]),
    ]


BAD_IDS = ["unknown-hparam", "hparam-bad-value", "hparam-nan", "missing-structure", "missing-initial-dataset",
           "unlabelled-initial-dataset", "missing-checkpoint", "checkpoint-mismatch", "negative-seed",
           "negative-walker-seed", "run-dir-is-a-file", "one-initial-frame", "vacancy-in-a-one-atom-cell",
           "oracle-not-installed"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_validate_and_run_refuse_a_bad_config_before_any_label(files: dict[str, Path], case: str,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    name, text, words = next(c for c in _bad_configs(files) if c[0] == case)
    path = files["root"] / f"{name}.yaml"
    path.write_text(text)
    run_dir = Path(text.split("run_dir: ")[1].split("\n")[0])

    assert main(["validate", str(path)]) == 2
    err = capfd.readouterr().err
    for word in words:
        assert word in err, (word, err)

    assert main(["run", str(path), "--no-prefect"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "rerun the same command to resume" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not (run_dir / "dataset").exists() and not (run_dir / "initial").exists()  # no label was computed


@NO_CUDA
def test_a_cuda_run_on_a_machine_without_cuda_stops_before_labelling(files: dict[str, Path],
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = files["root"] / "runs" / "cuda"
    path = files["root"] / "cuda.yaml"
    path.write_text(config_text(run_dir).replace("device: cpu", "device: cuda"))
    assert main(["validate", str(path)]) == 2
    assert "execution.device" in capfd.readouterr().err
    assert main(["run", str(path), "--no-prefect"]) == 2
    assert "execution.device" in capfd.readouterr().err
    assert not run_dir.exists()
    assert main(["validate", "--file-only", str(path)]) == 0  # meant for another machine: the file itself is fine


def test_the_good_config_validates(files: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(files["config"])]) == 0
    assert capfd.readouterr().out.startswith("OK ")


def test_the_device_resolver_names_the_setting() -> None:
    from alflow.devices import resolve_device
    from alflow.errors import DeviceError, InputError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(DeviceError, match="execution.device: unknown device 'gpu0'") as info:
        resolve_device("gpu0", what="execution.device")
    assert isinstance(info.value, InputError)
    with pytest.raises(DeviceError, match=f"has {torch.cuda.device_count()} CUDA device|CUDA is not available"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_every_device_resolver_is_the_one() -> None:
    """metrics, calculator, evaluator and registry.load resolve through alflow.devices (one function)."""
    import inspect

    import alflow.calculator
    import alflow.explore.evaluator
    import alflow.metrics
    from alflow.devices import resolve_device

    assert alflow.metrics.resolve_device is resolve_device and alflow.calculator.resolve_device is resolve_device
    assert not hasattr(alflow.explore.evaluator, "pick_device")
    assert "resolve_device(device)" in inspect.getsource(potentials.registry.load)

