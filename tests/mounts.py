"""Real filesystem conditions for the reliability tests: a command runs in a mount namespace of its own
(`unshare --mount`, as root), where a full disk is a small tmpfs and a read-only folder a read-only bind
mount; both are gone when the command ends."""
import os
import shlex
import subprocess

import pytest


def _permitted() -> bool:
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def private_mounts(setup: str) -> list:
    """A command prefix: the shell commands `setup`, then the command, in a mount namespace of its own.
    The test is skipped where that is not permitted, except in CI (CI=true), where it must run."""
    if not _permitted():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this test: `unshare --mount` and mount need root")
        pytest.skip("`unshare --mount` with mounts is not permitted here (needs root)")
    return ["unshare", "--mount", "sh", "-c", f'{setup} && exec "$@"', "sh"]


def in_private_mounts(setup: str, argv, timeout: int = 600) -> subprocess.CompletedProcess:
    """`argv` run with `private_mounts(setup)`."""
    return subprocess.run([*private_mounts(setup), *map(str, argv)], capture_output=True, text=True, timeout=timeout)


def small_disk(folder, size_bytes: int) -> str:
    """`setup` that mounts an empty tmpfs of `size_bytes` at `folder`."""
    os.makedirs(folder, exist_ok=True)
    return f"mount -t tmpfs -o size={size_bytes} tmpfs {shlex.quote(str(folder))}"


def read_only(folder) -> str:
    """`setup` that makes `folder` read-only (for root too)."""
    os.makedirs(folder, exist_ok=True)
    q = shlex.quote(str(folder))
    return f"mount --bind {q} {q} && mount -o remount,bind,ro {q}"
