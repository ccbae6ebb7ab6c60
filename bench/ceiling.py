"""
``python -m bench.ceiling KIND PORT FILE HEADERS``: the HTTP stack alone,
serving one cached manifest's bytes, so the manifests phase can say what
part of a request's cost is Twisted's and what part regcache's.

KIND ``twisted.web`` is a bare leaf Resource on a Site; ``klein`` a bare
Klein route on the same path pattern regcache routes registry requests
with (``/v2/<path:rest>``).  Both answer GET and HEAD with FILE's bytes and
the headers of the JSON object HEADERS (what regcache answered with), one
process on one core as regcache is, with no access log and no policy,
store, metrics or auth: the floor regcache cannot go below on this stack.

The manifests phase starts both with ``Ceiling`` and loads them with the
same wrk and ab commands as regcache and nginx.
"""

import json
import os
import sys

KINDS = ("twisted.web", "klein")


def serve(kind: str, port: int, body: bytes, headers: dict) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    fixed = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    length = str(len(body)).encode("ascii")

    def answer(request) -> bytes:
        for k, v in fixed:
            request.setHeader(k, v)
        request.setHeader(b"Content-Length", length)
        return b"" if request.method == b"HEAD" else body

    if kind == "twisted.web":
        class Leaf(Resource):
            isLeaf = True

            def render_GET(self, request):
                return answer(request)

            render_HEAD = render_GET

        root = Leaf()
    else:
        from klein import Klein

        app = Klein()

        @app.route("/v2/<path:rest>", methods=["GET", "HEAD"])
        def manifest(request, rest):
            return answer(request)

        root = app.resource()

    class Quiet(Site):
        def log(self, request):
            """No access log: the floor is the HTTP stack's cost alone."""

    reactor.listenTCP(port, Quiet(root), interface="127.0.0.1")
    print(f"serving {kind} on {port}", flush=True)
    reactor.run()


class Ceiling:
    """One ``bench.ceiling`` server as a bench subprocess, its URL base like a mirror's."""

    def __init__(self, kind: str, run_dir: str, file: str, headers: dict):
        from bench.servers import free_port

        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.file = file
        self.headers = headers
        self.log = os.path.join(run_dir, f"ceiling-{kind}.log")
        self.process = None

    def start(self) -> "Ceiling":
        from bench.servers import Process, wait_http

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "bench.ceiling", self.kind, str(self.port), self.file, json.dumps(self.headers)]
        self.process = Process(f"ceiling-{self.kind}", cmd, self.log, env).start()
        wait_http(self.url + "/v2/probe/manifests/x", self.process.proc)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def main(argv=None) -> int:
    kind, port, file, headers = (argv or sys.argv[1:])[:4]
    if kind not in KINDS:
        sys.exit(f"bench.ceiling: KIND is one of {', '.join(KINDS)}")
    with open(file, "rb") as f:
        body = f.read()
    serve(kind, int(port), body, json.loads(headers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
