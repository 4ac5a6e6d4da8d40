"""A real Slurm on localhost (Debian's slurm-wlm: munged, slurmctld, slurmd): the loop's stages run as Slurm jobs.

The session fixture ``slurm`` installs ``slurm-wlm`` and ``munge`` with apt-get when ``slurmctld`` is
missing (root only; minutes), writes a one-node ``slurm.conf`` for this machine, starts the daemons
on free ports and stops them at the end. Debian's Slurm has no accounting database here
(``AccountingStorageType=accounting_storage/none``: ``sacct`` answers "accounting storage is
disabled"), so jobs are checked in the job-completion log (``JobCompType=jobcomp/filetxt``): one line
per finished job with its id, name, state (COMPLETED, CANCELLED, TIMEOUT) and node list.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ORACLE_FIXTURES = ROOT / "tests" / "alflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> None:
    """apt-get install slurm-wlm munge (skip the test when that is impossible here)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if out.returncode:
            pytest.skip(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-1000:]}")


def parse_jobcomp(path: Path) -> dict[str, dict[str, str]]:
    """jobcomp/filetxt lines -> {JobId: {field: value}}."""
    jobs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
    return jobs


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node Slurm: yields {"conf", "jobcomp", "node", "logs"}; SLURM_CONF is set meanwhile."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root")
    _install()
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (base / sub).mkdir()
    node = socket.gethostname()
    cpus = os.cpu_count() or 1
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=alflowtest", f"SlurmctldHost={node}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool",
        f"SlurmctldPidFile={base}/slurmctld.pid", f"SlurmdPidFile={base}/slurmd.pid",
        f"SlurmctldLogFile={base}/log/slurmctld.log", f"SlurmdLogFile={base}/log/slurmd.log",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory", "JobAcctGatherType=jobacct_gather/linux",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt", f"JobCompLoc={base}/jobcomp.txt",
        "MpiDefault=none", "ReturnToService=2", "KillWait=5", "OverTimeLimit=0", "InactiveLimit=0", "MinJobAge=300",
        f"NodeName={node} CPUs={cpus} RealMemory=6000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[subprocess.Popen] = []
    munge_ok = subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0
    if not munge_ok:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        started.append(subprocess.Popen(["munged", "--foreground", "--force"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        for _ in range(50):
            if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("munged did not start (munge -n | unmunge fails)")
    for daemon in ("slurmctld", "slurmd"):
        started.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                break
            time.sleep(1)
        else:
            logs = "\n".join((base / "log" / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                             if (base / "log" / f).is_file())
            pytest.fail(f"Slurm did not come up (sinfo: {out.stdout.strip()!r} {out.stderr.strip()!r})\n{logs}")
        yield {"conf": conf, "jobcomp": base / "jobcomp.txt", "node": node, "logs": base / "jobs", "env": env,
               "slurmd_log": base / "log" / "slurmd.log"}
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        time.sleep(2)
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _wait_for_jobcomp(path: Path, ids: set[str], timeout: float = 60) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = parse_jobcomp(path)
        if ids <= set(jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def test_loop_iteration_runs_as_slurm_jobs_labels_on_cpu_jobs_training_on_gpu_jobs(slurm, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("prefect_dask")
    import importlib.util

    spec = importlib.util.spec_from_file_location("alflow_flows_conftest", ROOT / "tests" / "flows" / "conftest.py")
    flows_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flows_conftest)
    _write_config = flows_conftest._write_config  # the tiny flow run of tests/flows
    from prefect.testing.utilities import prefect_test_harness

    from alflow.loop import read_state
    from flows.active_learning import run_flow

    for key, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}.items():
        monkeypatch.setenv(key, value)  # the jobs inherit the submitting environment (sbatch --export=ALL)
    job = {"cores": 1, "memory": "2GB", "walltime": "00:20:00"}
    path = _write_config(tmp_path, name="slurm-flow", loop={"max_iterations": 1}, execution={
        "task_runner": "dask", "device": "cpu",
        "cluster": {"kind": "slurm", "log_directory": str(slurm["logs"]), "pools": {
            "gpu": {**job, "resources": {"GPU": 1}, "prologue": ["echo gpu pool prologue"]},
            "cpu": {**job, "resources": {"CPU": 1}}}},
        "dask_resources": {"train": {"GPU": 1}, "explore": {"GPU": 1}, "initial": {"CPU": 1}, "label": {"CPU": 1}}})
    with prefect_test_harness(server_startup_timeout=180):
        summary = run_flow(path)
    assert summary["status"] == "max_iterations" and summary["iterations"] == 1
    state = read_state(tmp_path / "run")
    stages = state["stages"]
    assert list(stages) == ["initial", "iter_000/train", "iter_000/explore", "iter_000/select"]
    ran_in = {key: rec["result"].get("batch_job") for key, rec in stages.items()}
    assert all(ran_in.values()), ran_in  # every stage ran inside a Slurm job
    jobs = _wait_for_jobcomp(slurm["jobcomp"], set(ran_in.values()))
    names = {key: jobs[j]["Name"] for key, j in ran_in.items()}  # select needs no resource: either pool
    assert (names["initial"], names["iter_000/train"], names["iter_000/explore"]) == (
        "alflow-cpu", "alflow-gpu", "alflow-gpu"), names
    for j in set(ran_in.values()):
        assert jobs[j]["NodeList"] == slurm["node"] and jobs[j]["JobState"] in ("CANCELLED", "COMPLETED"), jobs[j]
    assert state["iterations"][0]["labels_added"] >= 0 and (tmp_path / "run").is_dir()
    # the gpu pool's prologue ran in its job before the worker
    gpu_job = ran_in["iter_000/train"]
    assert "gpu pool prologue" in (slurm["logs"] / f"alflow-gpu-{gpu_job}.out").read_text()


N_WALLTIME_FRAMES = 10


def test_a_label_job_killed_at_its_walltime_loses_no_label(slurm, tmp_path, monkeypatch):
    """Slurm kills the job labelling frames (TIMEOUT); Dask resubmits the task to a new job (adaptive scaling);
    labels stored before the kill stay in the dataset and are not recomputed; every frame ends up labelled."""
    pytest.importorskip("dask_jobqueue")
    import ase.build
    import distributed

    from alflow.cluster import BatchCluster, adapt_kwargs
    from alflow.config import ClusterConfig, LabellingConfig
    from alflow.data import Dataset
    from alflow.label import LABELLED, label_frames

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    frames = []
    for i in range(N_WALLTIME_FRAMES):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=i)
        frames.append(atoms)
    # 10 frames x 12 s in one job of 1 minute: Slurm kills it (TIMEOUT). Slurm enforces time limits in a
    # periodic check (up to ~30 s late: a job of 8 x 10 s once finished at 83 s, before any kill), so the
    # work must outlast the limit by more than that.
    labelling = LabellingConfig(oracle="oracle_fixtures:SleepyHarmonic", timeout_s=60,
                                parameters={"delay": 12.0, "worker_pythonpath": str(ORACLE_FIXTURES)})
    cluster = ClusterConfig(kind="slurm", log_directory=str(slurm["logs"]), adapt={"minimum_jobs": 0, "maximum_jobs": 1},
                            pools={"cpu": {"cores": 1, "memory": "2GB", "walltime": "00:01:00", "jobs": 1}})
    dataset, workdir = tmp_path / "dataset", tmp_path / "label"
    with BatchCluster(cluster.model_dump(mode="json")) as batch, distributed.Client(batch) as client:
        batch.adapt(**adapt_kwargs(cluster))
        future = client.submit(label_frames, frames, labelling, str(dataset), str(workdir), progress=False,
                               max_workers=1, pure=False)
        result = future.result(timeout=600)
    ds = Dataset(dataset)
    assert len(ds.hashes) == N_WALLTIME_FRAMES  # nothing lost
    jobs = parse_jobcomp(slurm["jobcomp"])
    mine = [j for j in jobs.values() if j["Name"] == "alflow-cpu" and j["TimeLimit"] == "1"]
    assert any(j["JobState"] == "TIMEOUT" for j in mine), mine  # Slurm did kill a labelling job
    # the labels stored before the kill were not computed again: each frame labelled exactly once
    done = [line for line in (workdir / LABELLED).read_text().splitlines() if line.strip()]
    assert len(done) == N_WALLTIME_FRAMES, done
    assert result.n_labelled + result.n_in_dataset == N_WALLTIME_FRAMES and result.n_in_dataset >= 1, result


def test_labels_run_in_a_slurm_job_with_the_code_launched_as_a_job_step(slurm, tmp_path, monkeypatch):
    """labelling.mpi_command 'srun -n {cores}': each calculation's program is a step of the label job."""
    pytest.importorskip("dask_jobqueue")
    import ase.build
    import distributed

    from alflow.cluster import BatchCluster
    from alflow.config import ClusterConfig, LabellingConfig
    from alflow.data import Dataset
    from alflow.label import label_frames

    here = ROOT / "tests" / "integration" / "slurm_oracle"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    frames = []
    for i in range(3):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=100 + i)
        frames.append(atoms)
    markers = tmp_path / "markers"
    markers.mkdir()
    labelling = LabellingConfig(oracle="launched_oracle:LaunchedHarmonic", timeout_s=120, mpi_command="srun -n {cores}",
                                parameters={"command": f"{sys.executable} {here / 'launched_code.py'}",
                                            "marker_dir": str(markers), "worker_pythonpath": str(here)})
    cluster = ClusterConfig(kind="slurm", log_directory=str(slurm["logs"]),
                            pools={"cpu": {"cores": 1, "memory": "2GB", "walltime": "00:10:00", "jobs": 1}})
    with BatchCluster(cluster.model_dump(mode="json")) as batch, distributed.Client(batch) as client:
        result = client.submit(label_frames, frames, labelling, str(tmp_path / "ds"), str(tmp_path / "work"),
                               progress=False, max_workers=1, pure=False).result(timeout=300)
    assert result.n_labelled == 3 and len(Dataset(tmp_path / "ds").hashes) == 3, result
    steps = [p.name.split(".") for p in markers.iterdir()]
    # probe + 3 calculations, each its own step (srun) of one batch job, one task each (cores_per_calculation 1)
    assert len(steps) >= 3 and all(s[1] != "none" and s[2] == "1" for s in steps), steps
    job_ids = {s[0] for s in steps}
    assert len(job_ids) == 1 and job_ids != {"none"}
    jobs = _wait_for_jobcomp(slurm["jobcomp"], job_ids)
    assert jobs[job_ids.pop()]["Name"] == "alflow-cpu"


@pytest.mark.dft("espresso")
def test_a_quantum_espresso_label_runs_as_a_job_step_of_a_slurm_label_job(slurm, tmp_path, monkeypatch):
    """Real DFT inside the scheduler: pw.x started by ``srun --mpi=pmix -n {cores}`` inside the label job (Debian's QE)."""
    pytest.importorskip("dask_jobqueue")
    import re

    import distributed
    import numpy as np
    from ase.build import bulk

    from alflow.cluster import BatchCluster
    from alflow.config import ClusterConfig, LabellingConfig
    from alflow.data import Dataset
    from alflow.keys import REF_ENERGY, REF_FORCES
    from alflow.label import label_frames

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=3)
    # Debian's Open MPI is direct-launched by srun through PMIx (as on most clusters: srun --mpi=pmix)
    labelling = LabellingConfig(oracle="espresso", timeout_s=300, mpi_command="srun --mpi=pmix -n {cores}",
                                cores_per_calculation=1, kpoint_density=1.0,
                                parameters={"ecutwfc": 20, "electrons": {"conv_thr": 1e-7}})
    cluster = ClusterConfig(kind="slurm", log_directory=str(slurm["logs"]),
                            pools={"cpu": {"cores": 1, "memory": "2GB", "walltime": "00:10:00", "jobs": 1}})
    work = tmp_path / "work"
    with BatchCluster(cluster.model_dump(mode="json")) as batch, distributed.Client(batch) as client:
        job_id = client.submit(lambda: os.environ.get("SLURM_JOB_ID"), pure=False).result(timeout=300)
        result = client.submit(label_frames, [atoms], labelling, str(tmp_path / "ds"), str(work),
                               progress=False, max_workers=1, pure=False).result(timeout=600)
    assert result.n_labelled == 1, result
    ds = Dataset(tmp_path / "ds")
    (frame,) = ds.frames()
    forces = np.asarray(frame.arrays[REF_FORCES])
    assert forces.shape == (2, 3) and np.isfinite(forces).all() and np.abs(forces.sum(0)).max() < 1e-3
    assert float(frame.info[REF_ENERGY]) < -200  # two Si atoms with a PBE pseudopotential: about -15.8 Ry each
    assert frame.info["source"] == "dft"
    # slurmd launched the code as steps of the label job (the probe calculation and the label)
    steps = set(re.findall(rf"StepId={job_id}\.(\d+)", slurm["slurmd_log"].read_text()))
    assert job_id and steps, slurm["slurmd_log"].read_text()[-2000:]
    jobs = _wait_for_jobcomp(slurm["jobcomp"], {job_id})
    assert jobs[job_id]["Name"] == "alflow-cpu" and jobs[job_id]["NodeList"] == slurm["node"]
