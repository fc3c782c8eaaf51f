#!/usr/bin/env bash
# CI: make a real Slurm available to tests/slurm.
#
# Installs Debian's slurm-wlm (slurmctld, slurmd, sbatch/squeue/...) and munge
# when missing, then checks that a private single-node Slurm starts here: the
# LocalSlurm of tests/slurm/conftest.py (its own slurm.conf, munge key and
# socket, free ports, all under a temporary folder) runs one job and is stopped
# again.  Nothing is left running and /etc is not configured: the tests start
# and stop their own daemons.
#
# Exit 0: Slurm works here -- export FLOW_REQUIRE_SLURM=1 so that the Slurm
# tests fail rather than skip.  Exit 1: it cannot (not root, no apt-get, the
# daemons don't start); the Slurm tests then skip with the reason.
#
#   bash .ci/slurm.sh && export FLOW_REQUIRE_SLURM=1
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "slurm.sh: $*" >&2; }
need="munged slurmctld slurmd sbatch squeue scontrol scancel sinfo"
missing() {
    local b
    for b in $need; do command -v "$b" >/dev/null 2>&1 || return 0; done
    return 1
}

if missing; then
    if [ "$(id -u)" != 0 ]; then say "not root: cannot install slurm-wlm"; exit 1; fi
    if ! command -v apt-get >/dev/null 2>&1; then say "no apt-get: install slurm-wlm and munge"; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    pkgs="slurm-wlm munge"
    timeout 300 apt-get install -y --no-install-recommends $pkgs >/dev/null 2>&1 \
        || { timeout 300 apt-get update -q >/dev/null \
             && timeout 300 apt-get install -y --no-install-recommends $pkgs; } \
        || { say "apt-get install $pkgs failed"; exit 1; }
fi
if missing; then say "still missing some of: $need"; exit 1; fi
if [ "$(id -u)" != 0 ]; then say "not root: slurmd cannot run jobs"; exit 1; fi

timeout 120 python - <<'EOF' || { say "a private Slurm does not start here"; exit 1; }
import importlib.util, sys, tempfile
spec = importlib.util.spec_from_file_location("slurm_conftest", "tests/slurm/conftest.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with tempfile.TemporaryDirectory(prefix="slurm-check-") as tmp:
    s = mod.LocalSlurm(tmp)
    try:
        s.start()
        job = s.run("sbatch", "--parsable", "-o", f"{tmp}/out", "--wrap", "echo ok").strip()
        state, code = s.wait_job(job, timeout=60)
        print(f"slurm.sh: {s.run('sinfo', '--version').strip()}, {s.cpus} CPUs: "
              f"test job {job} {state} {code}", file=sys.stderr)
        sys.exit(0 if (state, code) == ("COMPLETED", "0:0") else 1)
    except Exception as e:
        print(f"slurm.sh: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        s.stop()
EOF
