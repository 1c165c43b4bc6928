"""Passwordless ssh to the loopback "nodes", for DeepSpeed's pdsh runner (`deepspeed --hostfile H` run once on node
0, which ssh's to every host): a throwaway `sshd` on a free port of 127.0.0.1 and 127.0.0.2, with its own host key,
user key and configuration in a temporary directory. Nothing of the machine's is touched: not ~/.ssh (OpenSSH reads
~/.ssh/config from the home in /etc/passwd, not $HOME, so an `ssh` on the runner's PATH adds `-F` with this
directory's client configuration), not the system's sshd or its configuration.

    with LoopbackSshd(tmp_path) as sshd:
        result = sshd.deepspeed(["127.0.0.1", "127.0.0.2"], "launch/train.py", *args)
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launching import LOOPBACK_NODES, REPO, free_port, rank_env

SSH_NODES = LOOPBACK_NODES[:2]  # where the sshd listens; 127.0.0.3 is a host no sshd answers on
MISSING = ".ci/run installs them (apt-get install openssh-server pdsh)"
# what the ranks need from this environment, which DeepSpeed's runner does not pass through ssh (it exports only
# PYTHON*, MLFLOW*, MV2*, UCX* and the lines of its .deepspeed_env file): one OpenMP thread each, and this PATH
RANK_VARIABLES = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PATH")


def program(name: str, *folders: str) -> str:
    """`name`'s path (on PATH or in `folders`); the test fails, never skips, where it is not installed."""
    found = shutil.which(name) or next((f"{d}/{name}" for d in folders if os.access(f"{d}/{name}", os.X_OK)), None)
    if not found:
        pytest.fail(f"`{name}` is not installed: the tests of `deepspeed --hostfile` over ssh need Debian's "
                    f"openssh-server and pdsh; {MISSING}")
    return found


class LoopbackSshd:
    """An sshd for this user on 127.0.0.1:PORT and 127.0.0.2:PORT while the `with` block runs, and what a
    `deepspeed --hostfile` launch through it needs: a client configuration, an `ssh` that uses it, the ranks'
    variables in a DeepSpeed environment file (DS_ENV_FILE), all under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        program("pdsh")  # DeepSpeed's runner finds it on PATH
        self.ssh, self.sshd = program("ssh"), program("sshd", "/usr/sbin", "/usr/local/sbin")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LoopbackSshd:
        folder, user = self.folder, getpass.getuser()
        (folder / "bin").mkdir(parents=True)
        for key in ("host_key", "user_key"):
            subprocess.run([program("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", key, "-f",
                            str(folder / key)], check=True, capture_output=True)
        shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
        listen = "".join(f"ListenAddress {host}:{self.port}\n" for host in SSH_NODES)
        (folder / "sshd_config").write_text(
            f"{listen}HostKey {folder / 'host_key'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
            f"AllowUsers {user}\nPermitRootLogin prohibit-password\nPidFile none\nUsePAM no\nStrictModes no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowTcpForwarding no\n"
            "X11Forwarding no\nPrintMotd no\nLogLevel ERROR\n")
        (folder / "ssh_config").write_text(
            f"Host *\n  User {user}\n  IdentityFile {folder / 'user_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n  ConnectTimeout 10\n")
        shim = folder / "bin" / "ssh"
        ssh = shlex.join([self.ssh, "-F", str(folder / "ssh_config")])
        shim.write_text(f"#!/bin/sh\nexec {ssh} \"$@\"\n")
        shim.chmod(0o755)
        environment = rank_env()
        (folder / "deepspeed_env").write_text("".join(f"{name}={environment[name]}\n" for name in RANK_VARIABLES))
        if os.geteuid() == 0:
            # sshd started by root needs its privilege-separation directory, which Debian's service creates at boot
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(folder / "sshd.log", "w")
        self.process = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(folder / "sshd_config")],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_listening(folder / "sshd.log")
        return self

    def _wait_listening(self, log: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for host in SSH_NODES:
            while True:
                try:
                    socket.create_connection((host, int(self.port)), timeout=1).close()
                    break
                except OSError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.__exit__()
                        raise AssertionError(f"sshd did not listen on {host}:{self.port}: {log.read_text()}")
                    time.sleep(0.05)

    def sessions(self, grace: float = 0.0) -> list[psutil.Process]:
        """What runs under this sshd (its ssh sessions and the commands they started) after at most `grace` seconds
        for it to end."""
        deadline = time.monotonic() + grace
        while True:
            try:
                running = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return []
            if not running or time.monotonic() > deadline:
                return running
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        """Stops the sessions still running (a failed test's ranks), by their ids, then the sshd."""
        for process in self.sessions():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.kill()
        self.process.wait()

    def env(self) -> dict[str, str]:
        """The environment of a `deepspeed` runner that ssh's through this sshd."""
        environment = rank_env()
        return dict(environment, PATH=f"{self.folder / 'bin'}{os.pathsep}{environment['PATH']}",
                    DS_ENV_FILE=str(self.folder / "deepspeed_env"))

    def deepspeed(self, hosts: list[str], *args: str, ssh_port: str = "", timeout: float = 600,
                  ranks_per_host: int = 1) -> tuple[subprocess.CompletedProcess, float]:
        """`deepspeed --hostfile H --master_addr 127.0.0.1 --master_port P --ssh_port S ARGS` in the repository,
        H naming `hosts` (`ranks_per_host` slots each), S this sshd's port unless `ssh_port` says another; its
        result and its wall time in seconds. Past `timeout` its process group is killed with SIGKILL: DeepSpeed's
        runner answers SIGTERM or SIGINT with `pkill -f` of every DeepSpeed launcher on every host, and here every
        host is this machine."""
        hostfile = self.folder / f"hostfile-{'-'.join(hosts)}"
        hostfile.write_text("".join(f"{host} slots={ranks_per_host}\n" for host in hosts))
        cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", LOOPBACK_NODES[0], "--master_port",
               free_port(), "--ssh_port", ssh_port or self.port, *args]
        started = time.monotonic()
        with subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) as runner:
            try:
                out, err = runner.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(runner.pid, signal.SIGKILL)
                out, err = runner.communicate()
        return subprocess.CompletedProcess(cmd, runner.returncode, out, err), time.monotonic() - started
