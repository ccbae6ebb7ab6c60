"""
A recording HTTP relay on loopback, in a process of its own, for the
redirect tests: put in front of SeaweedFS's S3 port and given to regcache
as its endpoint, so that the presigned URLs regcache hands out point at
it, it writes down every request's line and headers (and the status of
its answer) before relaying it unchanged, bytes both ways.

One request per connection: it asks for ``Connection: close`` on each, so
it never has to find where one request ends and the next begins.  The
Host field goes through as sent, so signatures made for the relay's
address check out at the store.

Run as ``python -m tests.integration.recording_proxy PORT TARGET_PORT LOG``;
``Recorder`` starts and reads it.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import List

from tests.processes import free_port

#: Headers the relay drops, having asked for one request per connection.
_HOP = ("connection", "keep-alive", "proxy-connection")
_CHUNK = 256 * 1024


async def _pipe(reader, writer) -> None:
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except ConnectionError:
            pass


def _handler(target: int, log):
    async def handle(client_reader, client_writer):
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            client_writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")[:-2]
        request_line, fields = lines[0], [line.partition(":") for line in lines[1:]]
        headers = [(k.strip(), v.strip()) for k, _, v in fields]
        kept = [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP]
        relayed = "\r\n".join([request_line, *kept, "Connection: close", "", ""]).encode("latin-1")
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        server_writer.write(relayed)
        upload = asyncio.ensure_future(_pipe(client_reader, server_writer))
        status_line = await server_reader.readline()
        method, _, rest = request_line.partition(" ")
        log.write(json.dumps({
            "method": method, "target": rest.rpartition(" ")[0],
            "headers": {k.lower(): v for k, v in headers},
            "status": int(status_line.split(b" ")[1]) if status_line.count(b" ") else None,
        }) + "\n")
        log.flush()
        client_writer.write(status_line)
        await _pipe(server_reader, client_writer)
        upload.cancel()
        server_writer.close()

    return handle


async def _serve(port: int, target: int, path: str) -> None:
    with open(path, "a") as log:
        server = await asyncio.start_server(_handler(target, log), "127.0.0.1", port, limit=64 * 1024)
        async with server:
            await server.serve_forever()


class Recorder:
    """The relay as a subprocess: ``url`` is what regcache is given as its endpoint."""

    def __init__(self, target_port: int, directory: str):
        self.port = free_port()
        self.target_port = target_port
        self.log_path = os.path.join(directory, "relayed.jsonl")
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Recorder":
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.recording_proxy", str(self.port),
                                      str(self.target_port), self.log_path], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the recording relay did not start (exit {self.proc.poll()})")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def requests(self) -> List[dict]:
        """Every request relayed so far: method, target, headers (lower-cased names), status."""
        try:
            with open(self.log_path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
