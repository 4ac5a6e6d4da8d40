"""One table per concept: what derives from the oracle, ensemble and Voigt tables agrees with them.

The oracle list lived in eight places and the ensemble list in five, and they drifted; now each
lives once (``alflow.oracles.ORACLES``, ``alflow.ensembles.ENSEMBLES``) and these tests tie the
config literals, the CLI help, the engines' own lists and the docs tables to them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start: end if end > 0 else len(text)]


def test_docs_labelling_lists_exactly_the_oracle_table() -> None:
    from alflow.oracles import ORACLES

    table = _section((DOCS / "labelling.md").read_text(), "## Oracles")
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \|", table, flags=re.M)
    documented = {name: source for name, source in rows if ":" not in name}
    assert set(documented) == set(ORACLES), "docs/labelling.md and alflow.oracles.ORACLES list different oracles"
    assert documented == {name: o.source for name, o in ORACLES.items()}, "a label source differs from the table"


def test_config_cli_and_dispatch_derive_from_the_oracle_table() -> None:
    import argparse

    from alflow import config, oracles
    from alflow.commands import label

    assert config.BUILTIN_ORACLES == oracles.BUILTIN == tuple(oracles.ORACLES)
    assert oracles.BUILDERS == {name: o.build for name, o in oracles.ORACLES.items()}
    assert set(oracles.LOG_FILES) <= set(oracles.ORACLES)
    parser = argparse.ArgumentParser()
    label.add_arguments(parser)
    help_text = next(a.help for a in parser._actions if "--oracle" in a.option_strings)
    assert all(name in help_text for name in oracles.ORACLES)
    description = config.LabellingConfig.model_fields["oracle"].description
    assert all(name in description for name in oracles.ORACLES)
    row = next(line for line in (DOCS / "configuration.md").read_text().splitlines()
               if line.startswith("| `labelling.oracle` |"))
    assert all(name in row for name in oracles.ORACLES), "docs/configuration.md: the labelling.oracle row"
    for name in oracles.ORACLES:  # every built-in name validates, in any case
        assert config.LabellingConfig(oracle=name.upper()).oracle == name


def test_an_oracle_that_cannot_run_here_is_named_before_it_is_built(tmp_path: Path) -> None:
    from ase.build import bulk

    from alflow.oracles import OracleError, build_calculator, missing_requirement

    assert missing_requirement("emt") is None
    problem = missing_requirement("cp2k", {"command": "/nonexistent/cp2k_shell"})
    assert problem is not None and "/nonexistent/cp2k_shell" in problem and "PATH" in problem
    with pytest.raises(OracleError, match="not found on PATH"):  # was a bare AssertionError from ASE's shell
        build_calculator("cp2k", {"command": "/nonexistent/cp2k_shell"}, bulk("Si"), directory=tmp_path)
    assert "cannot import module" in (missing_requirement("no_such_module_x:Calc") or "")
    assert missing_requirement("no_such_module_x:Calc", {"worker_pythonpath": str(tmp_path)}) is None


def test_ensemble_lists_derive_from_the_one_table() -> None:
    import typing

    import argparse

    from alflow import config, ensembles
    from alflow.commands import md
    from alflow.explore import ase_md, batched, ipi

    assert typing.get_args(config.Ensemble) == ensembles.NAMES
    assert typing.get_args(config.ExplorationConfig.model_fields["engine"].annotation) == ensembles.ENGINES
    parser = argparse.ArgumentParser()
    md.add_arguments(parser)
    assert tuple(next(a.choices for a in parser._actions if "--engine" in a.option_strings)) == ensembles.ENGINES
    assert batched.ENSEMBLES == ensembles.for_engine("batched")
    assert ase_md.ENSEMBLES == ensembles.for_engine("ase")
    assert ipi.IPI_ENSEMBLES == ensembles.for_engine("ipi")
    assert config.ASE_ENSEMBLES == set(ensembles.for_engine("ase"))
    assert config.IPI_ENSEMBLES == set(ensembles.for_engine("ipi"))
    for name, spec in ensembles.ENSEMBLES.items():  # the config's pressure rule is the table's
        ok = {"required": 0.0, "forbidden": None, "optional": None}[spec.pressure]
        config.WalkerConfig(ensemble=name, pressure=ok)
        bad = {"required": None, "forbidden": 0.0, "optional": "skip"}[spec.pressure]
        if bad != "skip":
            with pytest.raises(ValueError, match="pressure"):
                config.WalkerConfig(ensemble=name, pressure=bad)


def test_docs_exploration_lists_each_engines_ensembles() -> None:
    from alflow.ensembles import for_engine

    text = (DOCS / "exploration.md").read_text()
    ase_table = _section(text, "## ASE walkers")
    rows = re.findall(r"^\| (`[^|]+`) \|", ase_table, flags=re.M)
    ase_documented = {name for row in rows for name in re.findall(r"`([^`]+)`", row)}
    assert ase_documented == set(for_engine("ase"))
    ipi_text = _section(text, "## i-PI").replace("\n", " ")
    listed = re.sub(r"\([^)]*\)", "", re.search(r"Ensembles: (.*?)\.\s", ipi_text).group(1))  # not "(nbeads, ...)"
    assert set(re.findall(r"`([a-z-]+)`", listed)) == set(for_engine("ipi"))


def test_the_one_voigt_conversion_is_ases_and_every_user_calls_it() -> None:
    import inspect

    from alflow import calculator, graph, io, label_worker
    from alflow.voigt import to_matrix, to_voigt

    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 3, 3))
    m = m + np.swapaxes(m, 1, 2)
    np.testing.assert_allclose(to_voigt(m), full_3x3_to_voigt_6_stress(m))
    np.testing.assert_allclose(to_matrix(to_voigt(m)), m)
    np.testing.assert_allclose(to_matrix(to_voigt(m[0])), voigt_6_to_full_3x3_stress(to_voigt(m[0])))
    np.testing.assert_allclose(io.voigt_stress(m[1]), to_voigt(m[1]))
    np.testing.assert_allclose(graph.voigt_to_matrix(to_voigt(m[2])), m[2])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        to_voigt(np.zeros(4))
    for module in (calculator, graph, io, label_worker):  # no private copy of the conversion left
        source = inspect.getsource(module)
        assert "full_3x3_to_voigt_6_stress" not in source and "[[xx, xy, xz]" not in source
        assert "[0, 1, 2, 1, 0, 0]" not in source


def test_stage_results_are_one_typed_table() -> None:
    """One stage table (alflow.results.RESULTS): the loop's stage names, the config's Dask stage names and the
    typed results that state.json stores as dicts and loop/report read back."""
    import dataclasses
    import json

    from alflow import loop, results
    from alflow.config import ExecutionConfig

    assert loop.STAGES == results.STAGES == ("initial", "train", "gate", "explore", "select", "label")
    ExecutionConfig(task_runner="dask", dask_resources={s: {"GPU": 1} for s in results.STAGES})
    with pytest.raises(ValueError, match="stage name"):
        ExecutionConfig(task_runner="dask", dask_resources={"training": {"GPU": 1}})
    examples = {
        "initial": results.Initial(n_labelled=3, dataset_size=5, species=(29,), elements=("Cu",)),
        "train": results.Trained(committee="iter_000/train/committee.pt", alpha=1.5, valid={"forces_rmse": 0.1},
                                 members=({"epochs": 2},)),
        "explore": results.Explored(walkers=(results.WalkerRecord("w0", "DONE", steps=10, frames=2),),
                                    statuses={"DONE": 1}, n_frames=2),
        "select": results.Selected(n_frames=2, n_selected=1, selected="iter_000/select/selected.extxyz"),
        "label": results.Labelled(n_frames=1, n_labelled=1, forces_rmse=0.2),
        "gate": results.Gated(gates=({"name": "eos", "passed": True, "errors": {"volume_rel": 0.001}},), passed=True,
                              n_frames=7, n_labelled=7),
    }
    assert set(examples) == set(results.RESULTS)
    for stage, obj in examples.items():
        stored = json.loads(json.dumps(obj.to_dict()))  # what state.json holds
        assert results.result_of(stage, stored) == obj
        back = results.RESULTS[stage].from_dict({**stored, "worker": "node:12", "from_a_newer_version": 1})
        assert back.worker == "node:12" and dataclasses.replace(back, worker=None) == obj
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.seconds = 1.0  # type: ignore[misc]
    old = {"n_frames": 1, "n_labelled": 1, "n_failed": 0, "dataset_size": 4, "seconds": 2.0}  # no n_attempts yet
    assert results.Labelled.from_dict(old).n_attempts == 0
    row = loop.iteration_row(0, examples["train"], examples["explore"], examples["select"], examples["label"], 3,
                             loop.LoopConfig())
    assert row["labels_total"] == 4 and row["walker_status"] == {"DONE": 1} and row["alpha"] == 1.5
    assert row == loop.iteration_row(0, *(json.loads(json.dumps(examples[s].to_dict()))
                                          for s in ("train", "explore", "select", "label")), 3, loop.LoopConfig())
