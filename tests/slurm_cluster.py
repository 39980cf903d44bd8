"""A real single-node Slurm for tests, from Debian's packages (slurmctld, slurmd, slurm-client,
munge; `.ci/run` installs them): configuration, state, spool, logs, pid files and the munge
socket all in one temporary folder, ports chosen free, each daemon started in the foreground and
stopped by its own process id. See /work/shared/reference/slurm-local.md."""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"


def missing_binaries() -> list:
    return [b for b in NEEDED if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`root` is created (or must be) world-traversable: munged refuses a socket under a private folder
    (pytest's own temporary folders are), so by default the cluster lives in a folder of its own
    under the system's temporary folder, removed by stop()."""

    def __init__(self, root: Path = None):
        self.own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="heart-slurm-")) if root is None else Path(root)
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.procs = {}

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def _run(self, *argv, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, check=check,
                              env=dict(os.environ, **self.env), timeout=60)

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)
        key = r / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=heart-test", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={r / 'munge' / 'munge.socket.2'}", "CredType=cred/munge",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}", "MailProg=/bin/true", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "ReturnToService=2", "MinJobAge=600",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
            "RealMemory=1000",
            "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
        socket_path = r / "munge" / "munge.socket.2"
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}",
                               f"--log-file={r / 'munge' / 'munged.log'}"])
        self._wait(lambda: socket_path.exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self._run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                   "the node to be idle")
        return self

    def _spawn(self, name: str, argv: list):
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=dict(os.environ, **self.env))

    def _wait(self, condition, what: str, seconds: float = 60):
        deadline = time.time() + seconds
        while not condition():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}:\n"
                                       + (self.root / "log" / f"{name}.out").read_text()[-2000:])
            if time.time() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.3)

    # ------------------------------------------------------------------ queries for the tests
    def jobs(self) -> dict:
        """Job id -> state of the queued and running jobs (array tasks one by one)."""
        out = self._run("squeue", "-h", "-r", "-o", "%i %T").stdout.split("\n")
        return dict(line.split() for line in out if line.strip())

    def job(self, job_id: str) -> dict:
        """scontrol's fields of one job (known for MinJobAge seconds after its end)."""
        p = self._run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)

    def finished(self) -> list:
        """The jobcomp file's records (one per finished job), as dicts."""
        if not self.jobcomp.is_file():
            return []
        return [dict(f.split("=", 1) for f in line.split() if "=" in f)
                for line in self.jobcomp.read_text().splitlines()]

    def cancel_all(self, seconds: float = 60):
        self._run("scancel", "--user", pwd.getpwuid(os.getuid()).pw_name, check=False)
        deadline = time.time() + seconds
        while self.jobs() and time.time() < deadline:
            time.sleep(0.5)

    def stop(self):
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):  # each by its own pid
                p = self.procs.get(name)
                if p is None or p.poll() is not None:
                    continue
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if self.own_root:
                shutil.rmtree(self.root, ignore_errors=True)
