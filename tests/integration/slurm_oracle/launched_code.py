"""The "code" LaunchedHarmonic starts: records the Slurm job step it runs in (argv[1]: the marker directory)."""

import os
import sys
from pathlib import Path

env = os.environ
name = f"{env.get('SLURM_JOB_ID', 'none')}.{env.get('SLURM_STEP_ID', 'none')}.{env.get('SLURM_NTASKS', 'none')}"
(Path(sys.argv[1]) / f"{name}.{os.getpid()}").write_text(env.get("SLURMD_NODENAME", ""))
