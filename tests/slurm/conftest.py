"""A real single-node Slurm for the cluster tests: munged, slurmctld and slurmd
started as processes with a private configuration, and stopped afterwards.

:class:`LocalSlurm` writes ``slurm.conf`` for this machine (its CPUs and
memory as ``slurmd -C`` reports them; free ports; a private munge key and
socket; state, spool and logs in one folder), starts the three daemons in the
foreground, each in its own session, and waits until the node is idle.
``stop()`` cancels every job of this private cluster, then ends the daemons
(SIGTERM, then SIGKILL).  Nothing touches ``/etc`` or a system Slurm.

Two partitions: ``flow`` (default; one job per CPU) and ``shared``
(``OverSubscribe=FORCE:4``: up to four jobs per CPU -- the benchmark uses it
to run more single-core workers than the machine has cores).

The ``slurm`` fixture (session) skips the tests with the reason when Slurm
cannot run here (not root, binaries or dask-jobqueue missing, daemons that do
not come up); with ``FLOW_REQUIRE_SLURM=1`` (CI, after ``.ci/slurm.sh``) it
fails instead.  ``bench/bench_slurm.py`` uses :class:`LocalSlurm` too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# the flow command and the worker jobs (which inherit this environment through sbatch)
# import the checkout under test, installed or not
_REPO = str(Path(__file__).resolve().parents[2])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _REPO]
)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODE = "flownode"


def unavailable() -> str | None:
    """Why a private Slurm cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "Slurm tests start slurmd, which needs root (run as root, e.g. in CI)"
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm is not installed (no {', '.join(missing)}): "
            "run .ci/slurm.sh (apt-get install slurm-wlm munge)"
        )
    # (not imported here: dask-jobqueue 0.9.0 replaces SIGINT's handler on import)
    if importlib.util.find_spec("dask_jobqueue") is None:
        return "dask-jobqueue is not installed (pip install 'flow-cbir[cluster]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hardware() -> dict[str, int]:
    """CPUs, sockets, cores, threads and memory (MiB) as slurmd sees them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    hw = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.splitlines()[0] if out else "")}
    if "CPUs" not in hw:
        hw = {"CPUs": os.cpu_count() or 1, "RealMemory": 1024}
    return hw


class LocalSlurm:
    """munged + slurmctld + slurmd for one node, private to ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self.conf = self.folder / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "munge"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        (f / "munge").chmod(0o755)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        hw = _hardware()
        layout = " ".join(
            f"{k}={hw[k]}"
            for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
            if k in hw
        )
        mem = max(256, int(hw.get("RealMemory", 1024) * 0.9))
        self.cpus, self.memory_mb = hw["CPUs"], mem
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""\
ClusterName=flowtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={f}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={hw["CPUs"]} {layout} \
RealMemory={mem} State=UNKNOWN
PartitionName=flow Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=shared Nodes={NODE} MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "wb")  # noqa: SIM115 -- closed in stop()
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        """Write the configuration, start the daemons, wait for an idle node."""
        self._write_config()
        m = self.folder / "munge"
        self._start(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--socket={m}/munge.socket",
                f"--key-file={m}/munge.key",
                f"--pid-file={m}/munged.pid",
                f"--seed-file={m}/munged.seed",
                f"--log-file={self.folder}/log/munged.log",
            ],
        )
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged")
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
        self._wait(lambda: self.node_state() in ("idle", "mixed", "allocated"), timeout, "node")
        return self

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"Slurm {what} did not come up ({why}):\n{self.logs()}")
            time.sleep(0.25)

    def logs(self, n: int = 1500) -> str:
        out = []
        for p in sorted((self.folder / "log").glob("*")):
            with contextlib.suppress(OSError):
                text = p.read_text(errors="replace").strip()
                if text:
                    out.append(f"--- {p.name} ---\n{text[-n:]}")
        return "\n".join(out)

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False).strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def queue(self) -> list[str]:
        """``squeue``: the jobs Slurm still has (pending, running, completing)."""
        return [x for x in self.run("squeue", "-h", "-o", "%i %j %T").splitlines() if x.strip()]

    def jobs(self) -> list[dict[str, str]]:
        """Every job Slurm remembers (finished ones too, for MinJobAge)."""
        out = self.run("scontrol", "-o", "show", "jobs", check=False)
        return [
            dict(re.findall(r"(\w+)=(\S*)", line))
            for line in out.splitlines()
            if line.startswith("JobId=")
        ]

    def wait_job(self, job: str, timeout: float) -> tuple[str, str]:
        """Poll until job ``job`` has ended; its (JobState, ExitCode)."""
        deadline = time.monotonic() + timeout
        while True:
            got = [j for j in self.jobs() if j.get("JobId") == job]
            state = got[0].get("JobState", "?") if got else "GONE"
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state, got[0].get("ExitCode", "") if got else ""
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still {state} after {timeout:.0f} s")
            time.sleep(0.5)

    def wait_empty(self, timeout: float = 30.0) -> list[str]:
        """Wait until ``squeue`` is empty; what is left after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := self.queue()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons (by process id)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--user", str(os.geteuid()), check=False)
                self.wait_empty(20)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
        for fh in self._logs:
            fh.close()
        self._logs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[LocalSlurm]:
    """A private single-node Slurm for the session; ``SLURM_CONF`` points at it."""
    required = os.environ.get("FLOW_REQUIRE_SLURM") == "1"
    why = unavailable()
    if why:
        if required:
            pytest.fail(f"FLOW_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    # short path: munge and slurm sockets live under it
    folder = Path(tmp_path_factory.mktemp("slurm"))
    s = LocalSlurm(folder)
    old = os.environ.get("SLURM_CONF")
    try:
        try:
            s.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            if required:
                raise
            pytest.skip(f"Slurm did not start here: {e}")
        os.environ["SLURM_CONF"] = str(s.conf)
        yield s
    finally:
        s.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
