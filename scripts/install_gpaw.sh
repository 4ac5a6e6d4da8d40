#!/usr/bin/env bash
# Install GPAW (serial, FFTW, libxc) into the active Python environment.
#
#   . .venv/bin/activate && bash scripts/install_gpaw.sh
#
# - system libraries: libxc (exchange-correlation), FFTW3 (plane waves), BLAS
# - a GPAW siteconfig with mpi=False (alflow isolates each calculation in its
#   own subprocess and sets OMP_NUM_THREADS; no MPI needed), fftw=True
# - `pip install gpaw gpaw-data` compiles the C extension (several minutes)
#   and installs the PAW setups (gpaw-data), so no download at run time.
# The siteconfig stays at $GPAW_SITECONFIG_DIR/siteconfig.py (default
# ~/.gpaw/siteconfig.py); GPAW_CONFIG is exported for this script's pip call,
# add `export GPAW_CONFIG=...` to your shell to rebuild later.
set -euo pipefail

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    echo "install_gpaw.sh: activate the Python environment first (. .venv/bin/activate)" >&2
    exit 2
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends libxc-dev libfftw3-dev libblas-dev liblapack-dev g++ make

CONF_DIR="${GPAW_SITECONFIG_DIR:-$HOME/.gpaw}"
mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/siteconfig.py" <<'PY'
# GPAW build configuration written by alflow scripts/install_gpaw.sh
mpi = False
fftw = True
scalapack = False
libraries = ['xc', 'fftw3', 'blas']
compiler = 'g++'
PY
export GPAW_CONFIG="$CONF_DIR/siteconfig.py"
echo "GPAW_CONFIG=$GPAW_CONFIG"

python -m pip install --no-cache-dir gpaw gpaw-data
python - <<'PY'
import gpaw
from gpaw import GPAW  # noqa: F401
print("gpaw", gpaw.__version__, "installed")
PY
