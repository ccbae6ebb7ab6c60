"""
Log observers for ``twistd --logger``: one JSON object per line, which
Kubernetes log pipelines (fluent-bit, Loki) index without a parser.

    twistd -n --pidfile= --logger=regcache.logs.json regcache
"""

import sys

from twisted.logger import jsonFileLogObserver


def json():
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
