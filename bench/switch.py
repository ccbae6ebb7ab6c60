"""
A switchable TCP relay in front of the upstream registry and its token
server, so the bench can take the upstream away without restarting the
mirrors that point at it.

Modes, set over a control port:

- ``forward``: relay each connection to its target.  Bytes move with
  ``splice(2)`` through a pipe, so the relay adds no copy through Python and
  does not cap a cold pull's speed.
- ``refuse``: the listening sockets are closed; a connect is refused, as when
  the upstream is stopped.
- ``blackhole``: connections are accepted and never answered, as when the
  upstream hangs or a firewall drops packets.

Every mode change closes the connections already open, so a mirror's pooled
keep-alive connection cannot keep it talking to the upstream of before.
``python -m bench.switch CONTROL_PORT LISTEN:TARGET_PORT [...]``; all on
127.0.0.1.
"""

import fcntl
import os
import socket
import sys
import threading

PIPE_SIZE = 1024 * 1024


class Relay:
    def __init__(self, pairs):
        self.pairs = pairs  # [(listen_port, target_port)]
        self.mode = "forward"
        self.lock = threading.Lock()
        self.listeners = {}
        self.conns = set()
        for listen, target in pairs:
            self._open(listen, target)

    def _open(self, listen: int, target: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", listen))
        s.listen(256)
        self.listeners[listen] = s
        threading.Thread(target=self._accept, args=(s, target), daemon=True).start()

    def _accept(self, listener, target: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by a switch to "refuse"
            with self.lock:
                mode = self.mode
                self.conns.add(client)
            if mode != "forward":
                continue  # black hole: hold it, never read, never answer
            try:
                server = socket.create_connection(("127.0.0.1", target))
            except OSError:
                self._drop(client)
                continue
            with self.lock:
                self.conns.add(server)
            ends = [2]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, ends, client, server), daemon=True).start()

    def _pump(self, src, dst, ends, client, server) -> None:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        try:
            while True:
                n = os.splice(src.fileno(), w, PIPE_SIZE)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with self.lock:
                ends[0] -= 1
                last = ends[0] == 0
            if last:
                self._drop(client)
                self._drop(server)

    def _drop(self, s) -> None:
        with self.lock:
            self.conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def set(self, mode: str) -> None:
        if mode not in ("forward", "refuse", "blackhole"):
            raise ValueError(mode)
        with self.lock:
            self.mode = mode
            conns, self.conns = list(self.conns), set()
        for s in conns:
            self._drop(s)
        if mode == "refuse":
            for port, s in list(self.listeners.items()):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
                del self.listeners[port]
        else:
            for listen, target in self.pairs:
                if listen not in self.listeners:
                    self._open(listen, target)


def control(port: int, relay: Relay) -> None:
    """One line in (a mode, or ``status``), one line out."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    while True:
        c, _ = s.accept()
        with c:
            line = c.makefile().readline().strip()
            try:
                if line != "status":
                    relay.set(line)
                c.sendall(f"ok {relay.mode}\n".encode())
            except ValueError:
                c.sendall(b"error\n")


def set_mode(control_port: int, mode: str) -> str:
    """Client side: switch the relay listening on ``control_port``."""
    with socket.create_connection(("127.0.0.1", control_port), timeout=5) as c:
        c.sendall(mode.encode() + b"\n")
        answer = c.makefile().readline().strip()
    if answer != f"ok {mode}" and mode != "status":
        raise RuntimeError(f"switch answered {answer!r} to {mode!r}")
    return answer


if __name__ == "__main__":
    pairs = [tuple(int(p) for p in arg.split(":")) for arg in sys.argv[2:]]
    control(int(sys.argv[1]), Relay(pairs))
