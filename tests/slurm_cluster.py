"""A one-machine Slurm cluster for tests/test_slurm.py: munged (as root, its own key and socket),
slurmctld and slurmd from Debian's `slurm-wlm` (`make test-slurm` installs both with apt), with a
generated slurm.conf naming this machine's CPUs and memory, `ProctrackType=proctrack/linuxproc` and
`TaskPlugin=task/none` (no cgroups in a container). Everything lives in one folder; `stop()` ends
the daemons and whatever jobs are left."""
import os
import shutil
import socket
import subprocess
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """What slurmd detects here (`slurmd -C`: CPUs, sockets, cores, memory), as a NodeName line."""
    found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return found


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.socket = os.path.join(root, "munge.socket")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        root = self.root
        for d in ("state", "spool", "munge"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        key = os.path.join(root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o600)
        os.chmod(os.path.join(root, "munge"), 0o700)
        subprocess.run(["munged", "--force", f"--socket={self.socket}", f"--key-file={key}",
                        f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                        f"--seed-file={root}/munge/munged.seed"], check=True)
        node = _node_line()
        host = node.split()[0].split("=")[1]
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=llmfoundrylite
SlurmctldHost={host}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
JobAcctGatherType=jobacct_gather/none
{node.split(" UpTime")[0]} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", self.conf], check=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t").strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not come up (state {state!r}):\n{self.logs()}")

    def run(self, *cmd: str) -> str:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env).stdout

    def logs(self) -> str:
        return "".join(open(os.path.join(self.root, n)).read()[-3000:] for n in ("slurmctld.log", "slurmd.log")
                       if os.path.exists(os.path.join(self.root, n)))

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = os.path.join(self.root, pid_file)
            if os.path.exists(path):
                try:
                    os.kill(int(open(path).read().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        shutil.rmtree(os.path.join(self.root, "state"), ignore_errors=True)
