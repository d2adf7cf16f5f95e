"""A real one-node Slurm cluster on localhost for tests, as a session-scoped pytest fixture.

Use it from any test module (no conftest needed):

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (registers the fixture)

    def test_job(slurm_cluster, tmp_path):
        job = slurm_cluster.submit(["--wrap", "hostname"], log=tmp_path / "job.out")
        assert slurm_cluster.wait(job) == "COMPLETED"

The fixture installs Debian's Slurm and munge when they are missing (root + apt only), writes
its own `slurm.conf` under a fresh /tmp folder (exported as SLURM_CONF, so plain `sbatch`,
`srun`, `squeue` ... in subprocesses talk to it), starts a munged of its own (own key and
socket, so concurrent test sessions never share one), slurmctld and slurmd, waits for
the node to be idle, and stops every daemon it started at the end of the session. Where Slurm
cannot be brought up (not root, no apt) the tests skip with the reason; under CI=true they fail
instead, so a broken setup never turns into a green run.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODE = "localhost"
PARTITION = "debug"
# Slurm's defaults are 6817/6818; ports from here on keep us clear of a real cluster on the host.
FIRST_PORT = 16817
# States after which a job will not run again by itself (a requeued job passes through PENDING).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE",
})


class SlurmSetupError(RuntimeError):
    """Slurm could not be installed or started here."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise SlurmSetupError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def install_slurm() -> None:
    """apt-get install Debian's Slurm + munge when a daemon or client is missing."""
    missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged") if not _which(b)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmSetupError(f"Slurm is not installed ({', '.join(missing)} missing) and we are not root")
    if not shutil.which("apt-get"):
        raise SlurmSetupError(f"Slurm is not installed ({', '.join(missing)} missing) and apt-get is absent")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-q"], timeout=600, env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES], timeout=900, env=env)


def _which(name: str) -> str | None:
    # Daemons live in sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _munge_works(socket_path: Path) -> bool:
    encoded = subprocess.run(["munge", "-n", "--socket", str(socket_path)], capture_output=True, timeout=10)
    if encoded.returncode != 0:
        return False
    decoded = subprocess.run(["unmunge", "--socket", str(socket_path)], input=encoded.stdout,
                             capture_output=True, timeout=10)
    return decoded.returncode == 0


def start_munge(folder: Path) -> subprocess.Popen:
    """A munged of this cluster's own (key, socket, pid, log in `folder`), run as user munge.

    Sharing the host's munged would tie clusters together: the session that started it would
    pull authentication from under every other cluster when it stops.
    """
    folder.mkdir(mode=0o700)
    key = folder / "munge.key"
    _run([_which("mungekey") or "mungekey", "--create", "--keyfile", str(key)])
    for path in (folder, key):
        shutil.chown(path, "munge", "munge")
    key.chmod(0o400)
    socket_path = folder / "munge.socket"
    # --foreground keeps it our child, so teardown stops exactly this process.
    proc = subprocess.Popen(
        [_which("runuser") or "runuser", "-u", "munge", "--", _which("munged"), "--foreground", "--force",
         f"--socket={socket_path}", f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
         f"--seed-file={folder / 'munged.seed'}", f"--log-file={folder / 'munged.log'}"],
        stdout=subprocess.DEVNULL, stderr=(folder.parent / "log" / "munged.stderr").open("w"),
        start_new_session=True,
    )
    _wait_for(lambda: _munge_works(socket_path), 20, "munged to answer (see log/munged.stderr)", proc)
    return proc


def _wait_for(ready, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise SlurmSetupError(f"gave up waiting for {what}: the daemon exited {proc.returncode}")
        time.sleep(0.5)
    raise SlurmSetupError(f"gave up waiting for {what} after {timeout:.0f} s")


def write_slurm_conf(root: Path, cpus: int, ports: tuple[int, int]) -> Path:
    """A one-node cluster: everything under `root`, no accounting, no cgroups."""
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=testcluster
SlurmctldHost={NODE}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s);
# releasing it sooner races the revoked credential of its previous run.
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` (there is no accounting database).
MinJobAge=3600
# The configured CPUs win over the detected ones: tiny test tasks may share cores.
SlurmdParameters=config_overrides
KillWait=10
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@dataclass
class SlurmCluster:
    """A running local cluster; every helper goes through the real Slurm client commands."""

    root: Path
    conf: Path
    partition: str = PARTITION
    node: str = NODE
    cpus: int = 2
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass it to subprocesses that call Slurm clients."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def ctld_log(self) -> Path:
        return self.log_dir / "slurmctld.log"

    @property
    def slurmd_log(self) -> Path:
        return self.log_dir / "slurmd.log"

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; return stdout."""
        return _run(cmd, check=check, timeout=timeout, env=self.env).stdout

    def submit(
        self,
        args: Sequence[str],
        *,
        log: str | Path | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """`sbatch --parsable ARGS` (a script and its arguments, or --wrap); returns the job id."""
        cmd = ["sbatch", "--parsable", f"--partition={self.partition}"]
        if log is not None:
            cmd.append(f"--output={log}")
        full_env = self.env | (env or {})
        proc = _run([*cmd, *args], check=False, env=full_env, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict of its Key=Value fields."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait(
        self, job_id: int, timeout: float = 300, until: frozenset[str] | set[str] = FINAL_STATES,
        poll: float = 1.0,
    ) -> str:
        """Poll until the job reaches one of `until`; return that state. Times out with the log tails."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in until:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n{self.diagnostics(job_id)}")

    def release_now(self, job_id: int) -> None:
        """Make a held or delayed job eligible now. Not for a job that was just requeued: its old
        credential is still revoked, and slurmd would kill the new start (this cluster's
        cred_expire lets requeued jobs start again after ~10 s by themselves)."""
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def diagnostics(self, job_id: int | None = None) -> str:
        parts = []
        if job_id is not None:
            parts.append(self.run("scontrol", "show", "job", str(job_id), check=False))
        parts.append(self.run("sinfo", "-N", "-l", check=False))
        for log in (self.ctld_log, self.slurmd_log):
            if log.is_file():
                parts.append(f"--- tail of {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).strip()

    def stop(self) -> None:
        """Cancel what is still queued or running, then stop our daemons: slurmd, slurmctld, munged."""
        if len(self._procs) == 3 and all(p.poll() is None for p in self._procs):
            # Jobs outliving slurmd would be orphans that no daemon ever cleans up.
            self.run("scancel", f"--partition={self.partition}", check=False)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", "-o", "%i", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._procs.clear()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _free_ports() -> tuple[int, int]:
    """Two free neighbouring ports: daemons left by a crashed session must not block the next one."""
    for port in range(FIRST_PORT, FIRST_PORT + 200, 2):
        if _port_free(port) and _port_free(port + 1):
            return port, port + 1
    raise SlurmSetupError(f"no two free ports in {FIRST_PORT}..{FIRST_PORT + 200}")


def start_cluster(root: Path | None = None, cpus: int | None = None) -> SlurmCluster:
    """Install if needed, configure and start a fresh one-node cluster; caller must `stop()` it."""
    if os.geteuid() != 0:
        raise SlurmSetupError("the local test cluster runs slurmd and munged as root/munge; not root here")
    install_slurm()
    root = Path(root or tempfile.mkdtemp(prefix="slurm-cluster-"))
    root.chmod(0o755)  # munged runs as user munge and must reach its folder inside
    cpus = cpus or max(4, os.cpu_count() or 1)
    conf = write_slurm_conf(root, cpus, _free_ports())
    cluster = SlurmCluster(root=root, conf=conf, cpus=cpus)
    env = cluster.env
    try:
        cluster._procs.append(start_munge(root / "munge"))
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", NODE]):
            log = open(root / "log" / f"{daemon[0]}.stderr", "w")
            cluster._procs.append(subprocess.Popen(
                [_which(daemon[0]), *daemon[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
            if daemon[0] == "slurmctld":
                _wait_for(lambda: _run(["scontrol", "ping"], check=False, env=env).returncode == 0,
                          30, f"slurmctld to answer (see {log.name})", cluster._procs[-1])
        _wait_for(lambda: cluster.node_state() == "idle", 60, f"node {NODE} to be idle", cluster._procs[-1])
    except BaseException as err:
        detail = cluster.diagnostics() if isinstance(err, SlurmSetupError) else ""
        cluster.stop()
        if detail:
            raise SlurmSetupError(f"{err}\n{detail}") from None
        raise
    atexit.register(cluster.stop)
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running local Slurm cluster for the whole session (see the module docstring)."""
    try:
        cluster = start_cluster()
    except SlurmSetupError as err:
        if _in_ci():
            pytest.fail(f"CI=true but the local Slurm cluster could not be started: {err}", pytrace=False)
        pytest.skip(f"no local Slurm cluster: {err}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


if __name__ == "__main__":
    # A cluster for trying things by hand: runs until Ctrl-C or SIGTERM, then stops its daemons.
    running = start_cluster()
    print(f"export SLURM_CONF={running.conf}   # logs in {running.log_dir}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
