"""execution.cluster (local, address, slurm, pbs): validation naming the field, the job scripts, the task runner."""

from __future__ import annotations

import copy

import pytest

from alflow.config import ConfigError, ExecutionConfig, config_from_dict

pytest.importorskip("dask_jobqueue", reason="execution.cluster slurm/pbs needs dask-jobqueue (pip install -e '.[cluster]')")

from alflow.cluster import job_scripts, worker_specs  # noqa: E402
from alflow.label import _attempt_parameters  # noqa: E402

BASE = {"name": "c", "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}}}
GPU_CPU = {"kind": "slurm", "pools": {
    "gpu": {"queue": "gpu-a100", "account": "chem123", "walltime": "04:00:00", "cores": 8, "memory": "64GB", "gpus": 2,
            "prologue": ["module load cuda/12.4", "source /opt/conda/bin/activate alflow"], "resources": {"GPU": 1},
            "directives": ["--constraint=a100"]},
    "cpu": {"queue": "compute", "account": "chem123", "walltime": "1-00:00:00", "cores": 32, "memory": "128GB",
            "jobs": 3, "prologue": ["module load quantum-espresso/7.2"]}}}


def _config(execution=None, labelling=None):
    data = copy.deepcopy(BASE)
    if execution is not None:
        data["execution"] = execution
    if labelling is not None:
        data["labelling"] = labelling
    return config_from_dict(data)


@pytest.mark.parametrize("execution, field, words", [
    ({"task_runner": "thread", "cluster": GPU_CPU}, "execution.cluster.kind", "task_runner: dask"),
    ({"task_runner": "dask", "cluster": "slurm"}, "execution.cluster.pools", "at least one pool"),
    ({"task_runner": "dask", "cluster": {"kind": "local", "pools": {"cpu": {}}}}, "execution.cluster.pools", "slurm or pbs"),
    ({"task_runner": "dask", "cluster": {"kind": "address"}}, "execution.cluster.address", "kind is address"),
    ({"task_runner": "dask", "cluster": {"kind": "sge", "pools": {"cpu": {}}}}, "execution.cluster.kind", "slurm"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"walltime": "2h"}}}},
     "execution.cluster.pools.cpu.walltime", "HH:MM"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"memory": "64"}}}},
     "execution.cluster.pools.cpu.memory", "unit"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"cores": 0}}}},
     "execution.cluster.pools.cpu.cores", "greater than or equal to 1"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"cores": 2, "processes": 4}}}},
     "execution.cluster.pools.cpu.processes", "per core"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"gpu": {"gpus": -1}}}},
     "execution.cluster.pools.gpu.gpus", "greater than or equal to 0"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"gpu": {"gpu_directive": "gpu"}}}},
     "execution.cluster.pools.gpu.gpu_directive", "gres"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"prologue": ["a\nb"]}}}},
     "execution.cluster.pools.cpu.prologue", "one non-empty line"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"resources": {"GPU": 0}}}}},
     "execution.cluster.pools.cpu.resources.GPU", "positive"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"queue": ""}}}},
     "execution.cluster.pools.cpu.queue", "at least 1 character"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"bad name": {}}}},
     "execution.cluster.pools.bad name", "pool name"),
    ({"task_runner": "dask", "cluster": {**GPU_CPU, "adapt": {"maximum_jobs": 4}}}, "execution.cluster.adapt",
     "exactly one pool"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {}}, "adapt": {"minimum_jobs": 5,
                                                                                         "maximum_jobs": 2}}},
     "execution.cluster.adapt.minimum_jobs", "minimum_jobs <= maximum_jobs"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {}}}, "dask_resources": {"train": {"GPU": 1}}},
     "execution.dask_resources.train.GPU", "no pool"),
    ({"task_runner": "dask", "dask_address": "tcp://a:1", "cluster": GPU_CPU}, "execution.dask_address", "not both"),
    ({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"queeu": "x"}}}},
     "execution.cluster.pools.cpu.queeu", "queue"),
])
def test_cluster_fields_are_validated_and_errors_name_the_field(execution, field, words):
    with pytest.raises(ConfigError) as err:
        _config(execution)
    text = str(err.value)
    assert field in text and words in text, text


@pytest.mark.parametrize("labelling, field, words", [
    ({"oracle": "emt", "mpi_command": "srun -n {cores}"}, "labelling.mpi_command", "inside the Python worker"),
    ({"oracle": "espresso", "mpi_command": "srun -n {ranks}"}, "labelling.mpi_command", "placeholder"),
    ({"oracle": "espresso", "mpi_command": "  "}, "labelling.mpi_command", "launcher command"),
    ({"oracle": "espresso", "cores_per_calculation": 4}, "labelling.cores_per_calculation", "needs mpi_command"),
    ({"oracle": "espresso", "mpi_command": "srun", "cores_per_calculation": 0}, "labelling.cores_per_calculation",
     "greater than or equal to 1"),
    ({"max_in_flight": 0}, "labelling.max_in_flight", "greater than or equal to 1"),
])
def test_labelling_mpi_fields_are_validated(labelling, field, words):
    with pytest.raises(ConfigError) as err:
        _config(labelling=labelling)
    assert field in str(err.value) and words in str(err.value), str(err.value)


def test_mpi_command_launches_the_codes_command():
    cfg = _config(labelling={"oracle": "espresso", "mpi_command": "srun -n {cores} --exclusive",
                             "cores_per_calculation": 16, "fallback_parameters": [{"input_data": {"mixing_beta": 0.3}}]})
    assert _attempt_parameters(cfg.labelling, 0)["command"] == "srun -n 16 --exclusive pw.x"
    assert _attempt_parameters(cfg.labelling, 1)["command"] == "srun -n 16 --exclusive pw.x"  # fallbacks too
    cfg = _config(labelling={"oracle": "cp2k", "mpi_command": "mpirun -np {cores}", "cores_per_calculation": 4,
                             "parameters": {"command": ["/opt/cp2k/cp2k_shell.psmp", "-s"]}})
    assert _attempt_parameters(cfg.labelling, 0)["command"] == ["mpirun", "-np", "4", "/opt/cp2k/cp2k_shell.psmp", "-s"]
    assert "command" not in _attempt_parameters(_config().labelling, 0)  # no launcher: parameters untouched


def test_dask_address_is_a_deprecated_alias_of_cluster_address():
    old = ExecutionConfig(task_runner="dask", dask_address="tcp://10.0.0.5:8786")
    new = ExecutionConfig(task_runner="dask", cluster={"kind": "address", "address": "tcp://10.0.0.5:8786"})
    assert old.resolved_cluster == new.resolved_cluster and new.resolved_cluster.kind == "address"
    assert old.cluster.kind == "local" and old.dask_address == "tcp://10.0.0.5:8786"  # kept as written (yaml dumps)
    assert ExecutionConfig().cluster.kind == "local"


def test_slurm_job_scripts_hold_partition_account_walltime_gres_prologue_and_resources():
    cfg = _config({"task_runner": "dask", "cluster": GPU_CPU, "dask_resources": {"train": {"GPU": 1}}})
    scripts = job_scripts(cfg.execution.cluster)
    assert set(scripts) == {"gpu", "cpu"}
    gpu, cpu = scripts["gpu"].splitlines(), scripts["cpu"].splitlines()
    for line in ("#SBATCH -p gpu-a100", "#SBATCH -A chem123", "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --constraint=a100", "module load cuda/12.4",
                 "source /opt/conda/bin/activate alflow"):
        assert line in gpu, (line, scripts["gpu"])
    assert any("dask_worker" in w and "--resources GPU=1" in w for w in gpu)
    # the prologue runs before the worker starts
    assert gpu.index("module load cuda/12.4") < next(i for i, w in enumerate(gpu) if "dask_worker" in w)
    for line in ("#SBATCH -p compute", "#SBATCH -t 1-00:00:00", "module load quantum-espresso/7.2"):
        assert line in cpu, (line, scripts["cpu"])
    assert not any("gres" in w or "--resources" in w for w in cpu)
    gpus = copy.deepcopy(GPU_CPU)
    gpus["pools"]["gpu"]["gpu_directive"] = "gpus"
    assert "#SBATCH --gpus=2" in job_scripts(_config({"task_runner": "dask", "cluster": gpus}).execution.cluster)["gpu"]
    specs = worker_specs(cfg.execution.cluster)  # jobs per pool: 1 gpu, 3 cpu
    assert sorted(specs) == ["cpu-0", "cpu-1", "cpu-2", "gpu-0"]
    assert specs["gpu-0"]["options"]["worker_extra_args"] == ["--resources", "GPU=1"]


def test_pbs_job_script_holds_queue_account_walltime_gpus_and_prologue():
    cfg = _config({"task_runner": "dask", "cluster": {**GPU_CPU, "kind": "pbs"}})
    script = job_scripts(cfg.execution.cluster)["gpu"].splitlines()
    for line in ("#PBS -q gpu-a100", "#PBS -A chem123", "#PBS -l walltime=04:00:00",
                 "#PBS -l select=1:ncpus=8:ngpus=2:mem=61036mb", "module load cuda/12.4"):
        assert line in script, (line, script)


def test_validate_prints_the_job_scripts(tmp_path, capsys):
    import yaml

    from alflow.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "execution": {"task_runner": "dask", "cluster": GPU_CPU}}))
    assert main(["validate", "--file-only", "--job-script", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cluster: slurm jobs (" in out and "gpu: 1 job(s) x 8 core(s), 2 GPU(s), resources GPU=1" in out
    assert "job script of pool gpu" in out and "#SBATCH --gres=gpu:2" in out and "#SBATCH -p compute" in out


def test_task_runner_for_each_cluster_kind():
    from prefect_dask import DaskTaskRunner

    from alflow.cluster import BatchCluster
    from flows.active_learning import task_runner

    local = task_runner(ExecutionConfig(task_runner="dask", max_workers=3))
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["dashboard_address"] == "127.0.0.1:8787"
    remote = task_runner(ExecutionConfig(task_runner="dask", cluster={"kind": "address", "address": "tcp://h:1"}))
    assert remote.address == "tcp://h:1"
    batch = task_runner(_config({"task_runner": "dask", "cluster": {"kind": "slurm", "pools": {"cpu": {"cores": 2}},
                                                                   "adapt": {"maximum_jobs": 5}}}).execution)
    assert isinstance(batch, DaskTaskRunner) and batch.cluster_class is BatchCluster
    assert batch.cluster_kwargs["cluster"]["pools"]["cpu"]["cores"] == 2
    assert batch.adapt_kwargs == {"minimum_jobs": 0, "maximum_jobs": 5}


def test_a_cluster_config_round_trips_and_its_stages_do_not_run_here(tmp_path):
    from alflow.config import config_to_yaml, load_config
    from alflow.preflight import runs_here

    for execution in ({"task_runner": "dask", "cluster": GPU_CPU, "dask_resources": {"train": {"GPU": 1}}},
                      {"task_runner": "dask", "dask_address": "tcp://10.0.0.5:8786"}):
        cfg = _config(execution)
        path = tmp_path / "copy.yaml"
        path.write_text(config_to_yaml(cfg))
        assert load_config(path).execution == cfg.execution
        assert not runs_here(cfg)  # the oracle and device are checked where the jobs run, not here
    assert runs_here(_config({"task_runner": "dask"}))


def test_settings_key_ignores_max_in_flight_and_an_unset_launcher_but_not_the_launcher():
    import json

    from alflow.config import LabellingConfig
    from alflow.label import code_version, settings_key

    plain = LabellingConfig(oracle="espresso")
    # the key a config had before mpi_command / cores_per_calculation / max_in_flight existed
    before = {k: v for k, v in plain.model_dump().items()
              if k not in ("max_force_warning", "max_in_flight", "mpi_command", "cores_per_calculation")}
    import hashlib
    import hmac

    old = hmac.new(b"s", json.dumps([before, code_version("espresso")], sort_keys=True, default=str).encode(),
                   hashlib.sha256).hexdigest()[:16]
    assert settings_key(plain, b"s") == old == settings_key(LabellingConfig(oracle="espresso", max_in_flight=8), b"s")
    launched = LabellingConfig(oracle="espresso", mpi_command="srun -n {cores}", cores_per_calculation=4)
    assert settings_key(launched, b"s") != old  # another launcher can decide whether a calculation succeeds
    assert settings_key(launched, b"s") != settings_key(launched.model_copy(update={"cores_per_calculation": 8}), b"s")
