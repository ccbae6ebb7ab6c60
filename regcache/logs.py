# test-case-name: tests.test_logs,tests.integration.test_status_proc
"""
The log formats: ``--log-format text`` is twistd's own, for terminals;
``--log-format json`` writes one JSON object per line, the shape Fluent
Bit's ``json`` parser reads (``time`` in ISO 8601 UTC, ``level``,
``message``) with every field of the event beside them, so the access log
and the upstream fetches are searchable by field.  docs/logs.md lists them.

twistd starts logging to its Application's ILogObserver component when no
``--logger`` is given, so the JSON observer is installed that way (see
``Observed``) and works alike under ``twistd -n regcache``, the
``regcache`` command and the container's entrypoint.  ``--logger
regcache.logs.json`` still names the same format, for twistd command
lines that already use it.
"""

import json as _json
import re
import sys
from datetime import datetime, timezone
from typing import Optional

from twisted.application.service import MultiService
from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

#: What the JSON line itself says; an event field of the same name is
#: dropped rather than allowed to overwrite it.
RESERVED = ("time", "level", "message", "namespace", "traceback")

#: Keys legacy ``twisted.python.log`` events carry beside their log_ keys;
#: the message already says what they hold.
_LEGACY = ("isError", "system", "format", "why", "failure", "printed")


#: What client-sent text may not carry into a log line as it is.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """
    Client-sent ``text`` (a path, a user name) with its control characters
    escaped (``\\x1b``), for a log field: a line break could forge a log
    line, and a terminal escape recolour or clear whoever reads the log.
    """
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _plain(value):
    """A value as JSON can hold it: what is not a plain value becomes its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _message(event: dict) -> str:
    """
    ``formatEvent(event)``, by ``str.format_map`` whenever that formats it
    at all: the same text, at a tenth of the cost of twisted.logger's
    ``string.Formatter``, which was half of each JSON access-log line's.
    What it cannot format (a ``{f()}`` call, which only twisted.logger
    makes, a missing field, a bad spec) is twisted.logger's to format.
    """
    fmt = event.get("log_format")
    if isinstance(fmt, str) and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


def json_line(event: dict) -> str:
    """One event as one line of JSON, or, should that fail, a line saying so."""
    try:
        out = {
            "time": datetime.fromtimestamp(event["log_time"], timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": event["log_level"].name,
            "message": _message(event),
            "namespace": event.get("log_namespace"),
        }
        failure = event.get("log_failure")
        if failure is not None:
            out["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if key.startswith("log_") or key in RESERVED or key in _LEGACY:
                continue
            out[key] = _plain(value)
        return _json.dumps(out, ensure_ascii=True, allow_nan=False, default=str) + "\n"
    except Exception as e:
        # An observer that raises is disabled for good: this line stands in.
        return _json.dumps({"time": None, "level": "error",
                            "message": f"regcache could not format a log event: {e!r}"}) + "\n"


def observer(log_format: str, logfile: Optional[str] = None) -> Optional[ILogObserver]:
    """
    The observer ``log_format`` asks for, writing to twistd's ``--logfile``
    if given, else stdout; None for ``text``, which twistd sets up itself.
    Made before logging starts, so it holds the real stdout, not the one
    twistd then redirects into the log.
    """
    if log_format != "json":
        return None
    out = sys.stdout if not logfile or logfile == "-" else LogFile.fromFullPath(logfile)
    return FileLogObserver(out, json_line)


def json() -> ILogObserver:
    """``twistd --logger regcache.logs.json``: the JSON format on stdout."""
    return FileLogObserver(sys.stdout, json_line)


class Observed(MultiService):
    """
    ``service`` as twistd's Application gets it, with the log observer it
    is to start logging to: a plugin's service meets the Application only
    when it is added to it, so that is when the observer is named.
    """

    def __init__(self, service, log_observer: ILogObserver):
        super().__init__()
        self.log_observer = log_observer
        service.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)
