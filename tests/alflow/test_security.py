"""Trust boundaries (docs/security.md): what a hostile directory, file, config or checkpoint cannot do.

Everything is real: EMT labels in real worker subprocesses, real CP2K calculator objects
(whose shell is started), real torch checkpoints, real files and umasks.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk

from alflow.config import (
    ConfigError,
    check_config_location,
    config_digest,
    config_from_dict,
    config_to_yaml,
    load_config,
)
from alflow.fileio import atomic_write_json, atomic_write_text
from alflow.io import DatasetError, read_frames, write_extxyz_atomic
from alflow.label import run_calculation
from alflow.oracles import build_calculator, shell_free_command
from alflow.secrets import REDACTED, expand_env, redact, scrub, secret_values

MINIMAL = {"name": "sec", "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61}}}


def cu(seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.02, seed=seed)
    return atoms


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for the test; the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


# ------------------------------------------------------------------ 1. label workers and the working directory
HOSTILE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n{rest}"


def test_label_workers_never_import_from_the_working_directory(tmp_path, monkeypatch):
    """A json.py / numpy.py lying in the directory alflow is run from must not run inside a label worker."""
    hostile = tmp_path / "downloaded"
    hostile.mkdir()
    markers = {name: tmp_path / f"{name}-ran" for name in ("json", "numpy", "ase")}
    for name, marker in markers.items():
        (hostile / f"{name}.py").write_text(HOSTILE.format(marker=str(marker), rest="raise SystemExit(3)\n"))
    monkeypatch.chdir(hostile)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    out = run_calculation(cu(), "emt", {}, tmp_path / "task", timeout_s=120)
    assert [m.name for m in markers.values() if m.exists()] == []
    assert out.status == "labelled", out.error + out.log_tail
    assert np.asarray(out.result["forces"]).shape == (4, 3)


def test_alflow_python_subprocesses_never_import_from_the_working_directory(tmp_path, monkeypatch):
    """The process watchdog (``python -m alflow.process guard``, started by ``alflow run``) in a hostile
    directory: ``-m`` would put it first on sys.path, before the standard library (``alflow.process.python_module``)."""
    import subprocess
    import time

    from alflow import process

    hostile = tmp_path / "downloaded"
    hostile.mkdir()
    markers = {name: tmp_path / f"{name}-ran" for name in ("json", "threading", "signal", "subprocess", "ctypes")}
    for name, marker in markers.items():
        (hostile / f"{name}.py").write_text(HOSTILE.format(marker=str(marker), rest="raise SystemExit(3)\n"))
    monkeypatch.chdir(hostile)
    child = subprocess.Popen(["sleep", "60"])
    watchdog = process.guard(child.pid)
    try:
        time.sleep(2.0)
        assert watchdog.poll() is None  # a hostile import would have ended it with status 3
    finally:
        process.stop(watchdog)
        child.kill()
        child.wait()
    assert [m.name for m in markers.values() if m.exists()] == []


def test_an_oracle_module_is_imported_from_the_named_path_only(tmp_path, monkeypatch):
    """``module:Class`` next to the working directory is not found unless named in worker_pythonpath."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_emt.py").write_text("from ase.calculators.emt import EMT as MyEMT\n")
    monkeypatch.chdir(plugins)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    out = run_calculation(cu(), "my_emt:MyEMT", {}, tmp_path / "a", timeout_s=120)
    assert out.status == "error" and "worker_pythonpath" in out.error
    out = run_calculation(cu(), "my_emt:MyEMT", {"worker_pythonpath": str(plugins)}, tmp_path / "b", timeout_s=120)
    assert out.status == "labelled", out.error + out.log_tail


# ------------------------------------------------------------------ 2. structure files are data
def _structure_dict(module: str) -> dict:
    """A pymatgen-shaped Structure dict whose @module/@class and site properties name ``module``."""
    return {
        "@module": module, "@class": "Payload", "charge": 0,
        "lattice": {"@module": module, "@class": "Payload", "matrix": [[3.61, 0, 0], [0, 3.61, 0], [0, 0, 3.61]],
                    "pbc": [True, True, True]},
        "sites": [{"species": [{"element": "Cu", "occu": 1}], "abc": [0, 0, 0], "xyz": [0, 0, 0], "label": "Cu",
                   "properties": {"magmom": {"@module": module, "@class": "Payload", "x": 1}}},
                  {"species": [{"element": "Cu", "occu": 1}], "abc": [0.5, 0.5, 0], "xyz": [1.805, 1.805, 0],
                   "label": "Cu", "properties": {}}],
    }


def test_reading_a_structure_never_imports_what_the_file_names(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "evil_payload.py").write_text(HOSTILE.format(marker=str(marker), rest="class Payload:\n    pass\n"))
    monkeypatch.syspath_prepend(str(lib))
    path = tmp_path / "structure.json"
    path.write_text(json.dumps(_structure_dict("evil_payload")))
    frames = read_frames(path)
    assert not marker.exists()
    assert len(frames) == 1 and frames[0].get_chemical_symbols() == ["Cu", "Cu"]
    np.testing.assert_allclose(frames[0].positions[1], [1.805, 1.805, 0.0])
    assert frames[0].pbc.all()


def test_the_fallback_reads_only_known_formats(tmp_path):
    path = tmp_path / "structure.weird"
    path.write_text("@module evil\n")
    with pytest.raises(DatasetError, match="CIF"):
        read_frames(path)
    bad = tmp_path / "disordered.json"
    data = _structure_dict("x")
    data["sites"][0]["species"] = [{"element": "Cu", "occu": 0.5}, {"element": "Au", "occu": 0.5}]
    bad.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"sites\[0\]"):
        read_frames(bad)


# ------------------------------------------------------------------ 3. external commands, pinned configs
def test_the_cp2k_command_runs_without_a_shell(tmp_path, monkeypatch):
    """Shell syntax in parameters.command is not interpreted: no command substitution, no ';'."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "injected"
    with pytest.raises(Exception):  # `true` is no CP2K shell: the calculator cannot start
        build_calculator("cp2k", {"command": f"true $(touch {marker}); touch {marker}"}, cu(), directory=tmp_path)
    assert not marker.exists()
    assert shell_free_command("OMP_NUM_THREADS=2 mpiexec -np 4 cp2k.psmp -s") == \
        "exec env OMP_NUM_THREADS=2 mpiexec -np 4 cp2k.psmp -s"
    assert shell_free_command(["cp2k shell", "-s"]) == "exec 'cp2k shell' -s"


def test_a_pinned_config_refuses_changed_content(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    digest = config_digest(path)
    assert load_config(path, sha256=digest).name == "sec"
    path.write_text(yaml.safe_dump({**MINIMAL, "labelling": {"oracle": "os:system"}}))
    with pytest.raises(ConfigError, match="differs from the pinned sha256"):
        load_config(path, sha256=digest)


def test_configs_only_from_the_allowed_directory(tmp_path, monkeypatch):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir(), other.mkdir()
    (allowed / "c.yaml").write_text("x")
    (other / "c.yaml").write_text("x")
    (allowed / "link.yaml").symlink_to(other / "c.yaml")  # a symlink out of the directory does not count
    monkeypatch.setenv("ALFLOW_CONFIG_DIR", str(allowed))
    assert check_config_location(allowed / "c.yaml") == (allowed / "c.yaml").resolve()
    for path in (other / "c.yaml", allowed / "link.yaml", allowed / ".." / "other" / "c.yaml"):
        with pytest.raises(ConfigError, match="ALFLOW_CONFIG_DIR"):
            check_config_location(path)
    monkeypatch.delenv("ALFLOW_CONFIG_DIR")
    check_config_location(other / "c.yaml")  # unset: every directory


# ------------------------------------------------------------------ 4. secrets
def test_env_references_are_expanded_and_never_written_back(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFLOW_TEST_PASSWORD", "s3cr3t-Pa55word")
    monkeypatch.setenv("ALFLOW_TEST_SCHEDULER", "tcp://127.0.0.1:8786")
    data = {**MINIMAL, "labelling": {"oracle": "emt", "parameters": {"password": "${ALFLOW_TEST_PASSWORD}",
                                                                       "note": "$${LITERAL}"}},
            "execution": {"task_runner": "dask", "dask_address": "${ALFLOW_TEST_SCHEDULER}"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert cfg.execution.dask_address == "tcp://127.0.0.1:8786"
    assert cfg.labelling.parameters["password"] == "${ALFLOW_TEST_PASSWORD}"  # expanded where the oracle is built
    assert expand_env(cfg.labelling.parameters) == {"password": "s3cr3t-Pa55word", "note": "${LITERAL}"}
    text = config_to_yaml(cfg)
    assert "s3cr3t" not in text and "127.0.0.1:8786" not in text and "${ALFLOW_TEST_SCHEDULER}" in text
    (tmp_path / "copy.yaml").write_text(text)
    assert load_config(tmp_path / "copy.yaml").model_dump() == cfg.model_dump()


def test_a_missing_env_var_names_the_field_the_variable_and_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("ALFLOW_TEST_UNSET", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "labelling": {"parameters": {"api_key": "${ALFLOW_TEST_UNSET}"}}},
                                   sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "api_key" in text)
    assert "labelling.parameters.api_key: environment variable ALFLOW_TEST_UNSET is not set" in str(info.value)
    assert f"[line {line}]" in str(info.value)


def test_redaction_keeps_references_and_hides_values():
    params = {"password": "hunter2", "api_key": "${KEY}", "nested": {"token": 123, "kpts": [2, 2, 2]},
              "oracle_settings": [{"secret": "x"}], "basis_set": "DZVP"}
    assert redact(params) == {"password": REDACTED, "api_key": "${KEY}", "nested": {"token": REDACTED, "kpts": [2, 2, 2]},
                              "oracle_settings": [{"secret": REDACTED}], "basis_set": "DZVP"}
    assert scrub("login failed for hunter2 (token 1234)", secret_values({"password": "hunter2", "token": 1234})) == \
        f"login failed for {REDACTED} (token {REDACTED})"


LEAKY = """from ase.calculators.emt import EMT


class Leaky(EMT):
    def __init__(self, **parameters):
        print("connecting with", parameters, flush=True)
        super().__init__()
        self.secret_parameters = parameters

    def calculate(self, *args, **kwargs):
        raise RuntimeError(f"login refused with {self.secret_parameters}")
"""


def test_failure_records_and_kept_task_files_hold_no_secret(tmp_path, monkeypatch):
    """An oracle that prints and raises its parameters, given a literal and an env secret: no file under
    the work directory (failure record, kept task.json, worker log, error record) contains either."""
    from alflow.config import LabellingConfig
    from alflow.label import label_frames

    (tmp_path / "leaky_oracle.py").write_text(LEAKY)
    monkeypatch.setenv("ALFLOW_TEST_TOKEN", "env-token-0123456789")
    cfg = LabellingConfig(oracle="leaky_oracle:Leaky", retries=0, timeout_s=120,
                          parameters={"worker_pythonpath": str(tmp_path), "api_key": "literal-key-9876543210",
                                      "token": "${ALFLOW_TEST_TOKEN}"})
    work = tmp_path / "work"
    result = label_frames([cu()], cfg, tmp_path / "ds", work, progress=False, keep_scratch=True)
    assert result.n_labelled == 0
    records = [json.loads(line) for line in (work / "failures.jsonl").read_text().splitlines()]
    assert records and records[0]["parameters"]["api_key"] == REDACTED
    assert records[0]["parameters"]["token"] == "${ALFLOW_TEST_TOKEN}"
    assert "login refused" in records[0]["error"] and REDACTED in records[0]["error"]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"task.json", "worker.log", "error.json"} <= names  # the scratch directory was kept
    for path in files:
        content = path.read_bytes()
        assert b"literal-key-9876543210" not in content and b"env-token-0123456789" not in content, path


def test_files_respect_the_umask(tmp_path, umask):
    import potentials

    model = potentials.build("schnet", species=[29], cutoff=3.0, n_atom_basis=4, n_filters=4, n_interactions=1,
                             n_rbf=4)
    for mask, expected in ((0o077, 0o600), (0o022, 0o644), (0o002, 0o664)):
        umask(mask)
        out = tmp_path / f"m{mask:o}"
        out.mkdir()
        write_extxyz_atomic([cu()], out / "a.extxyz")
        atomic_write_text(out / "b.txt", "x")
        atomic_write_json(out / "c.json", {"a": 1})
        potentials.save(model, out / "d.pt")
        modes = {p.name: oct(mode_of(p)) for p in out.iterdir()}
        assert modes == dict.fromkeys(["a.extxyz", "b.txt", "c.json", "d.pt"], oct(expected))
    umask(0o022)
    atomic_write_text(tmp_path / "secret.json", "{}", mode=0o600)
    assert mode_of(tmp_path / "secret.json") == 0o600


# ------------------------------------------------------------------ 5. checkpoint metadata is bounded
@pytest.fixture(scope="module")
def schnet_checkpoint(tmp_path_factory):
    import potentials

    path = tmp_path_factory.mktemp("ckpt") / "schnet.pt"
    potentials.save(potentials.build("schnet", species=[29], cutoff=4.0, n_atom_basis=8, n_filters=8,
                                     n_interactions=2, n_rbf=8), path)
    return path


def _crafted(source: Path, target: Path, change) -> Path:
    payload = torch.load(source, weights_only=True)
    meta = json.loads(payload["metadata"])
    change(meta)
    torch.save({**payload, "metadata": json.dumps(meta)}, target)
    return target


@pytest.mark.parametrize("field, value, message", [
    ("n_atom_basis", 10**9, "metadata.hparams.n_atom_basis = 1000000000: expected an integer of at most"),
    ("n_atom_basis", 50_000, "does not describe the stored weights"),
    ("n_atom_basis", 12, "weight 'embedding.weight' has shape (1, 8); the metadata's model needs (1, 12)"),
    ("n_interactions", 60_000, "has more than"),  # stopped on the meta device long before 60000 blocks
    ("n_interactions", 3, "do not match the metadata's model"),
    ("n_rbf", float("nan"), "metadata.hparams.n_rbf"),
    ("evil", 1, "unknown hyperparameter(s) evil"),
])
def test_checkpoint_metadata_is_bounded_before_building(schnet_checkpoint, tmp_path, field, value, message):
    import potentials
    from potentials.registry import CheckpointError

    path = _crafted(schnet_checkpoint, tmp_path / "bad.pt", lambda m: m["hparams"].__setitem__(field, value))
    with pytest.raises(CheckpointError) as info:
        potentials.load(path, device="cpu")
    assert message in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("key, value, message", [
    ("cutoff", 1e6, "metadata.cutoff"), ("species", list(range(1, 120)), "metadata.species"),
    ("dtype", "save", "metadata.dtype"), ("architecture", "os:system", "metadata.architecture"),
])
def test_checkpoint_scalars_are_bounded(schnet_checkpoint, tmp_path, key, value, message):
    import potentials
    from potentials.registry import CheckpointError

    path = _crafted(schnet_checkpoint, tmp_path / "bad.pt", lambda m: m.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=message):
        potentials.load(path, device="cpu")


def test_a_committee_checkpoint_cannot_ask_for_more_members_than_the_bound(tmp_path):
    import potentials
    from potentials.committee import Committee
    from potentials.registry import CheckpointError

    members = [potentials.build("schnet", species=[29], cutoff=3.0, n_atom_basis=4, n_filters=4, n_interactions=1,
                                n_rbf=4) for _ in range(2)]
    potentials.save(Committee(members), tmp_path / "c.pt")
    path = _crafted(tmp_path / "c.pt", tmp_path / "bad.pt", lambda m: m.__setitem__("members", m["members"] * 150))
    with pytest.raises(CheckpointError, match="metadata.members"):
        potentials.load(path, device="cpu")
    assert len(potentials.load(tmp_path / "c.pt", device="cpu").members) == 2


@pytest.mark.slow
def test_a_mace_checkpoint_cannot_ask_for_a_billion_features(tmp_path):
    """MACE cannot be built on the meta device (e3nn computes constants): the allocation guard stops it."""
    import potentials
    from potentials.registry import CheckpointError

    potentials.save(potentials.build("mace", species=[29], cutoff=4.0), tmp_path / "m.pt")
    path = _crafted(tmp_path / "m.pt", tmp_path / "bad.pt",
                    lambda m: m["hparams"].__setitem__("hidden_irreps", "1000000000x0e"))
    with pytest.raises(CheckpointError, match="would allocate a tensor of 1,000,000,000 elements"):
        potentials.load(path, device="cpu")


# ------------------------------------------------------------------ 16. small points
@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "/abs", "a\\b"])
def test_a_run_name_is_one_directory_under_runs(name, tmp_path):
    with pytest.raises(ConfigError, match=r"name: the run name is one directory name"):
        config_from_dict({**MINIMAL, "name": name}, base_dir=tmp_path)
    cfg = config_from_dict({**MINIMAL, "name": "cu-emt v2"}, base_dir=tmp_path)
    assert cfg.run_dir == tmp_path / "runs" / "cu-emt v2"


def test_divergence_names_the_epoch_it_happened_in(tmp_path):
    """Epochs count from 1 (history row k is epoch k, row 0 the initial weights): a model that cannot
    survive its first update diverges in epoch 1, and the last good weights are those of epoch 0."""
    import potentials
    from alflow.config import TrainingConfig
    from alflow.keys import REF_ENERGY, REF_FORCES
    from alflow.train import TrainingDivergedError, train_potential
    from ase.calculators.emt import EMT

    frames = []
    for i in range(10):
        atoms = cu(seed=i)
        atoms.calc = EMT()
        atoms.info[REF_ENERGY], atoms.arrays[REF_FORCES] = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    torch.manual_seed(0)
    model = potentials.build("schnet", species=[29], cutoff=3.0, n_atom_basis=4, n_filters=4, n_interactions=1, n_rbf=4)
    config = TrainingConfig(epochs=5, batch_size=2, grad_clip=None, ema_decay=None).model_copy(update={"lr": 1e30})
    with pytest.raises(TrainingDivergedError) as info:
        train_potential(model, frames[:8], frames[8:], config, device="cpu", progress=False)
    assert info.value.epoch == 1 and info.value.best_epoch == 0
    assert "at epoch 1)" in str(info.value) and "(epoch 0," in str(info.value)
