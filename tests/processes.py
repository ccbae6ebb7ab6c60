"""
Helpers for the subprocesses tests run (regcache, the fake Hub, a real
docker-registry): ports on loopback, and stopping a process for sure.
"""

import socket
import subprocess


def free_port(interface: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the server binds it itself)."""
    with socket.socket() as s:
        s.bind((interface, 0))
        return s.getsockname()[1]


def terminate(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
