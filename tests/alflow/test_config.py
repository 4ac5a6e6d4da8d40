"""Tests of the run configuration (alflow.config) and the validate/schema commands."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from alflow.cli import main
from alflow.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    json_schema,
    known_architectures,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cu_emt" / "config.yaml"
MINIMAL: dict[str, Any] = {"name": "t", "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}}}


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (default MINIMAL) with the dotted ``path`` set to ``value``."""
    data = copy.deepcopy(base or MINIMAL)
    node: Any = data
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return data


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return info.value.errors


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ valid configs
def test_example_validates() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.name == "cu_emt"
    assert cfg.system.build is not None and cfg.system.build.element == "Cu" and cfg.system.build.cubic
    assert cfg.system.supercell == (2, 2, 2)
    assert cfg.potential.architecture == "schnet" and cfg.potential.cutoff == 4.5
    assert cfg.committee.size == 4
    assert cfg.exploration.engine == "batched"
    ensembles = [(w.ensemble, w.temperature, w.pressure) for w in cfg.exploration.walkers]
    assert ensembles == [("nvt-langevin", 300, None), ("nvt-langevin", 800, None),
                         ("nvt-langevin", 1000, None), ("npt-iso", 600, 0.0)]
    assert cfg.labelling.oracle == "emt"
    assert cfg.loop.max_iterations == 6 and cfg.loop.convergence_fraction == 0.9
    assert cfg.run_dir == EXAMPLE.parent / "runs" / "cu_emt"


def test_example_builds_32_atoms() -> None:
    from ase.build import bulk

    b = load_config(EXAMPLE).system.build
    atoms = bulk(b.element, b.crystal, a=b.a, cubic=b.cubic).repeat(load_config(EXAMPLE).system.supercell)
    assert len(atoms) == 32


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = config_from_dict(MINIMAL, base_dir=tmp_path)
    assert cfg.run_dir == tmp_path.resolve() / "runs" / "t"
    assert cfg.seed == 0
    assert cfg.potential.architecture == "schnet" and cfg.potential.cutoff == 5.0 and cfg.potential.dtype == "float32"
    assert cfg.committee.size == 4 and cfg.committee.calibrate and not cfg.committee.bootstrap
    t = cfg.training
    assert (t.epochs, t.batch_size, t.lr, t.forces_weight, t.patience, t.ema_decay) == (200, 8, 1e-3, 10.0, 30, 0.99)
    assert cfg.exploration.engine == "batched" and len(cfg.exploration.walkers) == 1
    assert cfg.exploration.walkers[0].timestep == 2.0 and cfg.exploration.walkers[0].stride == 10
    assert (cfg.selection.lower, cfg.selection.upper, cfg.selection.diversity) == (0.05, 0.5, "fps")
    assert cfg.labelling.oracle == "emt" and cfg.labelling.timeout_s == 3600
    assert cfg.loop.max_iterations == 10 and cfg.loop.convergence_fraction == 0.99
    assert cfg.execution.task_runner == "thread" and cfg.execution.device == "auto"
    assert cfg.system.initial_rattle is not None


def test_relative_paths_resolved_against_config_dir(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nrun_dir: out\nsystem:\n  structures: [POSCAR, sub/a.cif]\n"
                           "  initial_dataset: data.extxyz\npotential: {checkpoint: m.pt}\n")
    cfg = load_config(path)
    base = tmp_path.resolve()
    assert cfg.run_dir == base / "out"
    assert cfg.system.structures == [str(base / "POSCAR"), str(base / "sub" / "a.cif")]
    assert cfg.system.initial_dataset == str(base / "data.extxyz")
    assert cfg.potential.checkpoint == str(base / "m.pt")


def test_yaml_1_2_floats_and_custom_oracle() -> None:
    cfg = config_from_dict(with_("labelling", {"oracle": "my_pkg.calc:MyCalc", "parameters": {"tol": 1e-6}}))
    assert cfg.labelling.oracle == "my_pkg.calc:MyCalc"
    text = "name: t\nsystem: {build: {element: Cu}}\ntraining: {lr: 1e-3}\npotential: {hparams: {eps: 1e-5}}\n"
    from alflow.config import _Loader

    data = yaml.load(text, Loader=_Loader)
    assert data["potential"]["hparams"]["eps"] == 1e-5  # a float, not the string "1e-5"


def test_ramps_and_ipi_pimd() -> None:
    walkers = [{"ensemble": "pimd", "temperature": [100, 300], "steps": 100, "nbeads": 8},
               {"ensemble": "npt-aniso", "temperature": 500, "pressure": [0, 2.5], "steps": 100}]
    cfg = config_from_dict(with_("exploration", {"engine": "ipi", "walkers": walkers}))
    assert cfg.exploration.walkers[0].temperature == [100.0, 300.0]
    assert cfg.exploration.walkers[1].pressure == [0.0, 2.5]


# ------------------------------------------------------------------ error paths
@pytest.mark.parametrize(
    ("path", "value", "field", "shown"),
    [
        ("training.lr", -1, "training.lr", "-1"),
        ("training.ema_decay", 1.0, "training.ema_decay", "1.0"),
        ("training", {"valid_fraction": 0.6, "test_fraction": 0.5}, "training.test_fraction", "0.5"),
        ("training", {"energy_weight": 0, "forces_weight": 0}, "training.forces_weight", "0.0"),
        ("potential.architecture", "transformer9000", "potential.architecture", "'transformer9000'"),
        ("potential.cutoff", 0, "potential.cutoff", "0"),
        ("potential.dtype", "float16", "potential.dtype", "'float16'"),
        ("committee.size", 1, "committee.size", "1"),
        ("selection.upper", 0.01, "selection.upper", "0.01"),
        ("selection.adaptive_fraction", 1.5, "selection.adaptive_fraction", "1.5"),
        ("selection.diversity", "kmeans", "selection.diversity", "'kmeans'"),
        ("labelling.oracle", "not an oracle", "labelling.oracle", "'not an oracle'"),
        ("labelling.oracle", "pkg.mod.Class", "labelling.oracle", "'pkg.mod.Class'"),
        ("loop.convergence_fraction", 0, "loop.convergence_fraction", "0"),
        ("loop.convergence_fraction", 1.2, "loop.convergence_fraction", "1.2"),
        ("execution.task_runner", "slurm", "execution.task_runner", "'slurm'"),
        ("execution.dask_address", "tcp://x:8786", "execution.dask_address", "'tcp://x:8786'"),
        ("system.build.element", "Xx", "system.build.element", "'Xx'"),
        ("system.supercell", [2, 0, 2], "system.supercell", "[2, 0, 2]"),
        ("system.min_cell_length", -3, "system.min_cell_length", "-3"),
        ("system.initial_rattle", {"n_frames": 0}, "system.initial_rattle.n_frames", "0"),
        ("exploration.engine", "lammps", "exploration.engine", "'lammps'"),
        ("exploration.walkers", [], "exploration.walkers", "[]"),
        ("exploration.walkers", [{"ensemble": "nvt-berendsen"}], "exploration.walkers.0.ensemble", "'nvt-berendsen'"),
        ("exploration.walkers", [{"steps": 0}], "exploration.walkers.0.steps", "0"),
        ("exploration.walkers", [{"temperature": -5}], "exploration.walkers.0.temperature", "-5"),
        ("exploration.walkers", [{"start": "melted"}], "exploration.walkers.0.start", "'melted'"),
        ("exploration.walkers", [{"steps": 5, "stride": 10}], "exploration.walkers.0.stride", "10"),
        ("exploration.walkers", [{}, {"ensemble": "npt-iso", "temperature": 300}], "exploration.walkers.1.pressure", "None"),
        ("exploration.walkers", [{"ensemble": "nve", "pressure": 1.0}], "exploration.walkers.0.pressure", "1.0"),
        ("exploration", {"engine": "batched", "walkers": [{"ensemble": "pimd"}]}, "exploration.walkers.0.ensemble", "'pimd'"),
        ("exploration", {"engine": "ase", "walkers": [{"ensemble": "pimd"}]}, "exploration.walkers.0.ensemble", "'pimd'"),
    ],
)
def test_error_names_field_and_value(path: str, value: Any, field: str, shown: str | None) -> None:
    errors = errors_of(with_(path, value))
    hits = [e for e in errors if e.startswith(f"{field}: ")]
    assert hits, errors
    if shown is not None:
        assert any(f"(got {shown})" in e for e in hits), errors


def test_ipi_rejects_nose_hoover() -> None:
    data = with_("exploration", {"engine": "ipi", "walkers": [{}, {"ensemble": "nvt-nose-hoover"}]})
    (error,) = errors_of(data)
    assert error.startswith("exploration.walkers.1.ensemble: engine 'ipi' cannot run") and "'nvt-nose-hoover'" in error


def test_structures_xor_build() -> None:
    both = with_("system.structures", ["a.xyz"])
    (error,) = errors_of(both)
    assert error.startswith("system: give exactly one of") and "['structures', 'build']" in error
    (error,) = errors_of({"name": "t", "system": {"supercell": [2, 2, 2]}})
    assert error.startswith("system: give exactly one of") and "(got None)" in error


def test_missing_name() -> None:
    assert errors_of({"system": MINIMAL["system"]}) == ["name: Field required"]


def test_extra_keys_rejected_by_name() -> None:
    errors = errors_of(with_("training.epoch", 5, with_("typo_section", {})))
    assert any(e.startswith("training.epoch: Extra inputs are not permitted") and "did you mean 'epochs'" in e for e in errors)
    assert any(e.startswith("typo_section: Extra inputs are not permitted") for e in errors)
    (error,) = errors_of(with_("exploration.walkers", [{"temprature": 300}]))
    assert error.startswith("exploration.walkers.0.temprature:") and "did you mean 'temperature'" in error


def test_every_error_is_listed(tmp_path: Path) -> None:
    text = "name: t\nsystem:\n  build: {element: Cu}\ntraining:\n  lr: -1\n  epochs: 0\ncommittee: {size: 1}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "config.yaml" in message and "3 errors" in message
    assert "training.lr: Input should be greater than 0 (got -1) [line 5]" in message
    assert "training.epochs:" in message and "committee.size:" in message
    assert len(info.value.errors) == 3


def test_value_repr_truncated() -> None:
    (error,) = errors_of(with_("potential.architecture", "x" * 500))
    assert len(error) < 300 and "..." in error


# ---------------------------------------------------------------- file problems
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nsystem:\n  build: {element: Cu\ntraining: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "broken.yaml:" in message and "YAML syntax error" in message
    assert any(f"broken.yaml:{n}:" in message for n in (3, 4, 5))


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nsystem: {build: {element: Cu}}\ntraining:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:5:\d+: .*duplicate key 'lr'"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_top_level_must_be_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml: the top level must be a mapping"):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ round trip
def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE)
    again = load_config(dump_config(cfg, tmp_path / "sub" / "dumped.yaml"))
    assert again == cfg
    ipi = config_from_dict(with_("exploration", {"engine": "ipi", "walkers": [
        {"ensemble": "pimd", "temperature": [100, 200], "nbeads": 2, "start": "surface", "miller": [1, 0, 0]}]}))
    assert load_config(dump_config(ipi, tmp_path / "ipi.yaml")) == ipi


def test_json_schema() -> None:
    schema = json_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    props = schema["properties"]
    for section in ("name", "system", "potential", "committee", "training", "exploration",
                    "selection", "labelling", "loop", "execution"):
        assert section in props
    assert "Å" in json.dumps(schema["$defs"]["PotentialConfig"], ensure_ascii=False)
    assert schema["$defs"]["TrainingConfig"]["additionalProperties"] is False


def test_known_architectures_fallback() -> None:
    names = known_architectures()
    assert "schnet" in names and all(isinstance(n, str) for n in names)


def test_run_config_is_the_model() -> None:
    assert isinstance(config_from_dict(MINIMAL), RunConfig)


# ------------------------------------------------------------------------- CLI
def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {EXAMPLE}: ")
    for word in ("schnet", "committee of 4", "4 walker", "emt", "6 iterations"):
        assert word in out


def test_cli_validate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "name: t\nsystem: {build: {element: Cu}}\ntraining: {lr: -1}\n", "bad.yaml")
    assert main(["validate", str(EXAMPLE), str(bad)]) == 2  # bad input: exit 2, as every command
    captured = capsys.readouterr()
    assert "OK " in captured.out
    assert "bad.yaml" in captured.err and "training.lr: Input should be greater than 0 (got -1)" in captured.err


def test_cli_validate_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--resolved", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "uncertain_patience: 20" in out


def test_cli_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "exploration" in schema["properties"]
    target = tmp_path / "schema.json"
    assert main(["schema", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == schema


def test_summary_names_the_foundation_not_the_default_architecture(tmp_path):
    from pathlib import Path

    from alflow.config import config_from_dict

    root = Path(__file__).resolve().parents[2]
    cfg = config_from_dict({"name": "f", "run_dir": str(tmp_path), "system": {"structures": [
        str(root / "examples/foundation/cu3au.extxyz")]}, "potential": {
        "foundation": str(root / "examples/foundation/standin_mace.pt")}, "labelling": {"oracle": "emt"}})
    assert "fine-tuned from standin_mace.pt" in cfg.summary() and "schnet" not in cfg.summary()
