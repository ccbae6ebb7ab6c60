# test-case-name: tests.test_logs
"""
The log events and the JSON format: one event per request and per
upstream fetch with the fields docs/logs.md lists (checked against a JSON
Schema built from its table), the JSON line Fluent Bit reads, and the
observer installed where twistd looks for it.
"""

import json
import re
from pathlib import Path

import jsonschema
from hypothesis import given, settings, strategies as st
from twisted.application.service import Application
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from regcache import config, logs, tap
from regcache.identity import Identity
from regcache.metrics import Metrics
from regcache.site import RegcacheSite
from tests.support import Client, FedBody, HubRig, Rig, blob

DOC = Path(__file__).resolve().parent.parent / "docs" / "logs.md"
ROW = re.compile(r"^\| `(\w+)` \| ([a-z ]+) \| ([a-z, ]+) \| .+ \|$", re.M)
TYPES = {"string": "string", "integer": "integer", "number": "number", "null": "null"}
KINDS = ("request", "upstream", "fill")

ALL = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, " \
      "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


def documented_fields():
    """(field, JSON types, events) for each row of docs/logs.md's field table."""
    rows = []
    for name, types, events in ROW.findall(DOC.read_text()):
        rows.append((name, [TYPES[t] for t in types.split(" or ")], [e.strip() for e in events.split(",")]))
    return rows


def line_schema():
    """
    The JSON Schema of a log line, from the table: the fields of "all" on
    every line; an event of a documented kind has exactly its fields.
    """
    rows = documented_fields()
    common = {n: {"type": t} for n, t, events in rows if "all" in events}
    branches = []
    for kind in KINDS:
        fields = dict(common, **{n: {"type": t} for n, t, events in rows if kind in events})
        fields["event"] = {"const": kind}
        branches.append({"if": {"properties": {"event": {"const": kind}}, "required": ["event"]},
                         "then": {"properties": fields, "required": sorted(fields), "additionalProperties": False}})
    return {"type": "object", "properties": common, "required": sorted(common), "allOf": branches}


def check_lines(text: str):
    """Every line of ``text`` is one JSON object matching the documented fields; returns them."""
    validator = jsonschema.Draft202012Validator(line_schema())
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        errors = [e.message for e in validator.iter_errors(line)]
        assert errors == [], (line, errors)
    return lines


def as_json(events):
    return "".join(logs.json_line(e) for e in events)


class DocumentedFieldsTests(SynchronousTestCase):
    def test_table_is_read(self):
        """The table names the common fields and every kind's, so the schema checks something."""
        names = {n: events for n, _, events in documented_fields()}
        self.assertEqual([n for n, e in names.items() if "all" in e], ["time", "level", "message", "namespace"])
        for kind in KINDS:
            self.assertIn(kind, names["duration"])
        for field in ("method", "path", "status", "bytes", "duration", "cache", "upstream", "client", "user"):
            self.assertIn("request", names[field], field)
        for field in ("upstream", "member", "kind", "status", "bytes", "duration"):
            self.assertIn("upstream", names[field], field)

    def test_schema_refuses_an_undocumented_field(self):
        """A request event with a field the table lacks, or without one it lists, fails the check."""
        validator = jsonschema.Draft202012Validator(line_schema())
        rig = Rig()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        rig.client("/v2/")
        (line,) = [json.loads(logs.json_line(e)) for e in events if e.get("event") == "request"]
        self.assertTrue(validator.is_valid(line))
        self.assertFalse(validator.is_valid(dict(line, surprise=1)))
        del line["user"]
        self.assertFalse(validator.is_valid(line))


class JsonLineTests(SynchronousTestCase):
    def test_time_level_message_and_fields(self):
        """
        A line has ``time`` in ISO 8601 UTC, ``level``, ``message`` (the
        formatted text) and the event's own fields; bytes become text and
        other objects their str.
        """
        event = {"log_time": 1764590400.5, "log_level": LogLevel.warn, "log_namespace": "x.y",
                 "log_format": "{what} went {how}", "what": "it", "how": b"well", "obj": object,
                 "log_logger": Logger()}
        line = json.loads(logs.json_line(event))
        self.assertEqual(line["time"], "2025-12-01T12:00:00.500Z")
        self.assertEqual((line["level"], line["message"], line["namespace"]), ("warn", "it went b'well'", "x.y"))
        self.assertEqual((line["what"], line["how"], line["obj"]), ("it", "well", str(object)))
        self.assertNotIn("log_logger", line)

    def test_failure_gives_a_traceback(self):
        """An error event carries its traceback in a field of its own."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        event = {"log_time": 0.0, "log_level": LogLevel.critical, "log_format": "oops", "log_failure": failure}
        line = json.loads(logs.json_line(event))
        self.assertIn("ZeroDivisionError", line["traceback"])

    def test_an_event_cannot_overwrite_the_line_or_break_it(self):
        """
        A field named like the line's own is dropped, not written over it,
        and an event that cannot be formatted still gives one line.
        """
        event = {"log_time": 0.0, "log_level": LogLevel.info, "log_format": "hello", "time": "forged",
                 "level": "forged", "nan": float("nan")}
        text = logs.json_line(event)
        self.assertEqual(len(text.splitlines()), 1)
        line = json.loads(text)
        self.assertEqual(line["level"], "error")
        self.assertIn("could not format", line["message"])
        line = json.loads(logs.json_line({k: v for k, v in event.items() if k != "nan"}))
        self.assertEqual((line["time"], line["level"], line["message"]), ("1970-01-01T00:00:00.000Z", "info", "hello"))


class InstallTests(SynchronousTestCase):
    def test_json_observer_becomes_the_applications(self):
        """
        With ``--log-format json`` the service names the JSON observer as
        its Application's ILogObserver, where twistd looks when no
        ``--logger`` is given; with ``text`` it names none.
        """
        options = tap.Options()
        storage = self.mktemp()
        options.parseOptions(["--storage", storage, "--listen", "tcp:0:interface=127.0.0.1",
                              "--log-format", "json"])
        service = tap.makeService(options)
        self.assertIsInstance(service, logs.Observed)
        application = Application("regcache")
        service.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIs(observer, service.log_observer)
        options = tap.Options()
        options.parseOptions(["--storage", storage, "--listen", "tcp:0:interface=127.0.0.1"])
        self.assertNotIsInstance(tap.makeService(options), logs.Observed)

    def test_log_format_is_checked(self):
        """--log-format takes text or json, from the command line or REGCACHE_LOG_FORMAT; else a clear error."""
        self.assertEqual(config.load({}, {"REGCACHE_LOG_FORMAT": "JSON"}).log_format, "json")
        self.assertEqual(config.load({}, {}).log_format, "text")
        with self.assertRaises(config.ConfigError) as e:
            config.load({"log-format": "xml"}, {})
        self.assertEqual(str(e.exception), "--log-format: not a log format: 'xml' (use text or json)")


class RequestEventTests(SynchronousTestCase):
    def test_a_blob_miss_is_one_event_with_every_field(self):
        """
        A blob download is one request event: its method, path, status,
        bytes sent, duration on the clock from its headers to its end,
        cache outcome, upstream and client address, as documented.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        rig = Rig()
        data, digest = blob(5000)
        c = rig.client(f"/v2/library/app/blobs/{digest}?ns=docker.io")
        rig.reactor.advance(2.5)
        body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
        rig.upstream.answer(0, body)
        body.feed(data)
        body.end()
        self.assertEqual(c.body(), data)
        lines = check_lines(as_json(events))
        (request,) = [line for line in lines if line.get("event") == "request"]
        self.assertEqual({k: v for k, v in request.items() if k not in ("time", "message")}, {
            "level": "info", "namespace": "regcache.access", "event": "request", "method": "GET",
            "path": f"/v2/library/app/blobs/{digest}", "ns": "docker.io", "status": 200, "bytes": 5000, "duration": 2.5,
            "cache": "miss", "upstream": "docker.io", "error": None, "client": "192.168.1.1", "user": None,
        })
        (fill,) = [line for line in lines if line.get("event") == "fill"]
        self.assertEqual((fill["bytes"], fill["outcome"], fill["member"]), (5000, "landed", "hand-fed"))

    def test_who_asked_comes_from_the_identity(self):
        """A request client authentication identified is logged with its user and the address it trusted."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        class Identified(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.identity = Identity(user="ci", address="10.1.2.3")
                return b"ok"

        Client(RegcacheSite(Identified(), Metrics(), Rig().reactor), "/x", "GET", {})
        (request,) = [e for e in events if e.get("event") == "request"]
        self.assertEqual((request["user"], request["client"], request["cache"], request["upstream"]),
                         ("ci", "10.1.2.3", None, None))

    def test_a_long_path_is_cut(self):
        """A client's path reaches the log cut to 1024 characters."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        Rig().client("/v2/" + "a/" * 2000 + "manifests/latest")
        (request,) = [e for e in events if e.get("event") == "request"]
        self.assertEqual(len(request["path"]), 1024)


class UpstreamEventTests(SynchronousTestCase):
    def test_each_upstream_request_is_one_event_with_every_field(self):
        """
        A cold pull through the fake Hub logs one upstream event per
        request sent (token, manifest, blob and its CDN hop) and one fill,
        each with the documented fields.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        rig = HubRig()
        image = rig.images["library/small:1"]
        self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
        self.assertEqual(rig.get(f"/v2/library/small/blobs/{image.layers[0].digest}").status(), 200)
        lines = check_lines(as_json(events))
        upstream = [line for line in lines if line.get("event") == "upstream"]
        self.assertLessEqual({"manifest", "blob", "blob-redirect"}, {u["kind"] for u in upstream})
        self.assertEqual({u["member"] for u in upstream if u["kind"] == "manifest"}, {rig.hub.hosts["registry"]})
        (fill,) = [line for line in lines if line.get("event") == "fill"]
        self.assertEqual((fill["bytes"], fill["size"], fill["outcome"]), (image.layers[0].size,) * 2 + ("landed",))


class _Unformattable:
    def __format__(self, spec):
        raise ValueError("no format for me")


_format_pieces = st.sampled_from(["{value}", "{value!r}", "{value!s}", "{value:.3f}", "{value:>8}", "{value:d}",
                                  "{missing}", "{}", "{0}", "{value()}", "{{", "}}", "{", "}", "{item.real}",
                                  "{item[0]}", "{value.nothing}", " ", "text", "(", "é\n"])
_values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.lists(st.integers(), max_size=3), st.just(_Unformattable()))


@settings(max_examples=300, deadline=None)
@given(st.lists(_format_pieces, max_size=6).map("".join), _values, _values)
def test_a_json_line_says_what_twisted_logger_would(fmt, value, item):
    """
    Whatever the format and the fields (calls, missing fields, bad
    specs, values that cannot be formatted), a JSON line's message is the
    text twisted.logger's own formatEvent makes of the event.
    """
    event = {"log_format": fmt, "log_time": 0.0, "log_level": LogLevel.info, "value": value, "item": item}
    assert json.loads(logs.json_line(event))["message"] == formatEvent(event)
