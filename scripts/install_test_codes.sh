#!/usr/bin/env bash
# Reference codes the test suite runs when present (called by `make test`; CI runs it on a fresh machine):
#   Quantum ESPRESSO (pw.x) with Debian's pseudopotential set in /usr/share/espresso/pseudo, and
#   libpmix-dev so that Slurm's srun can direct-launch Debian's Open MPI (srun --mpi=pmix).
# tblite (GFN2-xTB) comes from PyPI with the `test` extra. Without root and apt-get nothing is installed
# and the tests that need these codes are skipped, naming the code (tests/conftest.py).
set -uo pipefail

need=()
command -v pw.x >/dev/null 2>&1 && [ -d /usr/share/espresso/pseudo ] || need+=(quantum-espresso quantum-espresso-data)
[ -e /usr/lib/x86_64-linux-gnu/libpmix.so ] || [ -n "$(ls /usr/lib/*/libpmix.so 2>/dev/null)" ] || need+=(libpmix-dev)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_codes: not root or no apt-get; tests needing ${need[*]} will be skipped" >&2
    exit 0
fi
echo "install_test_codes: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "install_test_codes: apt-get failed; tests needing ${need[*]} will be skipped" >&2
fi
exit 0
