# test-case-name: tests.test_status,tests.integration.test_status_proc
"""
The status page: what an operator wants at a glance (how many Docker Hub
pulls regcache spent against the limit, what each credential has left,
how well the cache works, what is downloading, how each upstream is
doing), as HTML at ``/status`` and as JSON at ``/status.json``.

Nothing here counts on its own behalf but the most pulled images: every
other figure is read from where it is already kept (pull accounting's
``snapshot()``, the Metrics registry, the fills under way, each upstream's
``health()``), so the page can never disagree with ``/metrics``.  The JSON
is the one collection; the HTML is rendered from it with
twisted.web.template, which escapes every value, and carries each key
figure again in a ``data-value`` attribute for scripts and tests.  The page
has no external assets (inline CSS, an inline SVG chart), so it works on a
mirror with no route to the internet, and its CSS lays it out for a phone
as well as a desktop.  docs/status.md lists the fields.
"""

import heapq
from datetime import datetime, timezone
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.web.template import Element, Tag, XMLString, flattenString, renderer, tags

from regcache import __version__
from regcache.accounting import Usage
from regcache.index import BLOB, MANIFEST

#: Cache lookup results that needed no download of their own, and the one
#: that did (``unreadable`` is neither: the cache held it, the disk failed).
#: ``shared`` came from the shared bucket: no upstream download either.
LOCAL_RESULTS = ("hit", "join", "revalidated", "stale")
HIT_RESULTS = LOCAL_RESULTS + ("shared",)
MISS_RESULTS = ("miss",)
#: What the shared level looks up in the bucket (regcache_shared_lookups_total).
SHARED_KINDS = ("blob", "blob_head", "manifest", "tag", "link")
LOOKUP_KINDS = ("blob", "manifest", "tag", "referrers")
SENDERS = ("sendfile", "read")

#: Names the most-pulled table keeps counts for, and how many it shows.
POPULAR_BOUND = 1000
POPULAR_SHOWN = 10


class UsageSource(Protocol):
    """Pull accounting as the page reads it (regcache.accounting)."""

    def snapshot(self) -> List[Usage]:
        ...


class Popular:
    """
    Pulls per repository name, for the "most pulled" table.  The names come
    from clients, so the table is bounded: once full, a new name takes the
    place of the least pulled one.  Names pulled often stay; a stream of
    one-off names only displaces each other.
    """

    def __init__(self, bound: int = POPULAR_BOUND):
        self.bound = bound
        self._counts: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, name: str) -> None:
        counts = self._counts
        if name in counts:
            counts[name] += 1
            return
        if len(counts) >= self.bound:
            del counts[min(counts, key=counts.__getitem__)]
        counts[name] = 1

    def top(self, n: int = POPULAR_SHOWN, keep: Callable[[str], bool] = lambda name: True) -> List[dict]:
        """The ``n`` most pulled of the names ``keep`` lets through."""
        shown = ((name, pulls) for name, pulls in self._counts.items() if keep(name))
        best = heapq.nsmallest(n, shown, key=lambda kv: (-kv[1], kv[0]))
        return [{"name": name, "pulls": pulls} for name, pulls in best]


class Status:
    """
    Collects the page's figures.  ``registries`` are the configured
    upstreams (regcache.policy.Registry), ``docker_hub`` the names of those
    that are Docker Hub, ``max_size`` the store's limit (None: unlimited),
    ``usage`` pull accounting (None until it is wired: no pulls counted),
    ``shared`` whether there is a shared level (``--storage-backend s3``).
    """

    def __init__(self, metrics, fills, registries: Sequence, clock, max_size: Optional[int],
                 usage: Optional[UsageSource] = None, docker_hub: Iterable[str] = (), shared: bool = False):
        self.metrics = metrics
        self.fills = fills
        self.registries = list(registries)
        self.clock = clock
        self.max_size = max_size
        self.usage = usage
        self.docker_hub = frozenset(docker_hub)
        self.shared = shared
        self.popular = Popular()

    def pulled(self, upstream: str, name: str) -> None:
        """
        A client resolved a tag of ``name`` on ``upstream``: one pull of it,
        kept as ``upstream/name`` (an upstream's name has no ``/``).
        """
        self.popular.add(f"{upstream}/{name}")

    def collect(self, visible: Optional[Callable[[str, str], bool]] = None) -> dict:
        """
        The page's figures for one reader: ``visible(upstream, name)`` says
        which repositories it may see named (the pull policy's answer for
        it), in the most pulled table and the downloads; None shows all.
        """
        visible = visible or (lambda upstream, name: True)
        usages = self.usage.snapshot() if self.usage is not None else []
        return {
            "version": __version__,
            "time": self.clock.seconds(),
            "docker_hub": self._docker_hub(usages),
            "credentials": [_usage(u) for u in usages],
            "cache": self._cache(),
            "levels": self._levels(),
            "bytes": self._bytes(),
            "store": self._store(),
            "top_images": self.popular.top(keep=lambda key: visible(*key.split("/", 1))),
            "downloads": [vars(p) for p in self.fills.progress() if visible(p.upstream, p.repository)],
            "upstreams": [
                {"upstream": r.name, "member": h.member, "state": h.state, "detail": h.detail,
                 "since": h.since, "until": h.until}
                for r in self.registries for h in r.upstream.health()
            ],
        }

    def render(self, visible: Optional[Callable[[str, str], bool]] = None) -> Deferred:
        """The HTML page of ``collect(visible)``, as a Deferred of bytes."""
        d = flattenString(None, _Page(self.collect(visible)))
        d.addCallback(lambda html: b"<!DOCTYPE html>\n" + html)
        return d

    def _docker_hub(self, usages: List[Usage]) -> dict:
        """
        Docker Hub's pulls summed over its credentials; the limit and what
        is left are summed over those that reported one (each credential
        has its own quota), None where none did.
        """
        hub = [u for u in usages if u.upstream in self.docker_hub]
        hourly = [sum(h) for h in zip(*(u.hourly_pulls for u in hub))] if hub else [0] * 24
        limits = [u.limit for u in hub if u.limit is not None]
        left = [u.remaining for u in hub if u.remaining is not None]
        windows = [u.window for u in hub if u.window is not None]
        return {
            "pulls_6h": sum(u.pulls_6h for u in hub),
            "pulls_24h": sum(u.pulls_24h for u in hub),
            "limit": sum(limits) if limits else None,
            "remaining": sum(left) if left else None,
            "window": max(windows) if windows else None,
            "hourly": hourly,
        }

    def _sample(self, name: str, labels: dict) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def _lookups(self, results) -> int:
        return int(sum(self._sample("regcache_cache_lookups_total", {"kind": k, "result": r})
                       for k in LOOKUP_KINDS for r in results))

    def _cache(self) -> dict:
        hits, misses = self._lookups(HIT_RESULTS), self._lookups(MISS_RESULTS)
        return {"hits": hits, "misses": misses,
                "hit_ratio": hits / (hits + misses) if hits + misses else None}

    def _levels(self) -> dict:
        """
        What each level answered: the local store, and the shared bucket
        (None with the local backend alone).  Leases and forwards are the
        coordinator's (regcache.leases); None where this build counts none.
        """
        local = {"hits": self._lookups(LOCAL_RESULTS)}
        if not self.shared:
            return {"local": local, "shared": None}

        def shared(counter: str, kinds, results) -> int:
            return int(sum(self._sample(counter, {"kind": k, "result": r}) for k in kinds for r in results))

        lookups = {k: {r: shared("regcache_shared_lookups_total", [k], [r]) for r in ("hit", "miss", "failed")}
                   for k in SHARED_KINDS}
        content = [k for k in SHARED_KINDS if k != "link"]
        return {"local": local, "shared": {
            "hits": sum(lookups[k]["hit"] for k in content),
            "misses": sum(lookups[k]["miss"] for k in content),
            "failed": sum(lookups[k]["failed"] for k in SHARED_KINDS),
            "lookups": lookups,
            "uploads": shared("regcache_shared_uploads_total", SHARED_KINDS, ["uploaded"]),
            "upload_failures": shared("regcache_shared_uploads_total", SHARED_KINDS, ["failed", "dropped"]),
            "leases_won": self._counted("leases", "regcache_leases_total", [{"result": "won"},
                                                                              {"result": "taken_over"}]),
            "forwarded": self._counted("forwards", "regcache_forwards_total",
                                       [{"direction": "sent", "result": "ok"}]),
        }}

    def _counted(self, attribute: str, name: str, labels: List[dict]) -> Optional[int]:
        """The sum of ``name``'s samples with ``labels``, or None if Metrics has no such counter."""
        if getattr(self.metrics, attribute, None) is None:
            return None
        return int(sum(self._sample(name, ls) for ls in labels))

    def _bytes(self) -> dict:
        served = int(sum(self._sample("regcache_served_blob_bytes_total", {"sender": s}) for s in SENDERS))
        # The fills label their bytes with the upstream's key (its name, as
        # service.py builds it).
        fetched = int(sum(self._sample("regcache_upstream_blob_bytes_total", {"upstream": r.upstream.key})
                          for r in self.registries))
        return {"served": served, "fetched": fetched, "saved": max(served - fetched, 0)}

    def _store(self) -> dict:
        used = int(self._sample("regcache_store_bytes", {}))
        return {
            "bytes": used,
            "limit": self.max_size,
            "used_ratio": used / self.max_size if self.max_size else None,
            "evicted": int(sum(self._sample("regcache_evicted_total", {"kind": k}) for k in (BLOB, MANIFEST))),
        }


def _usage(u: Usage) -> dict:
    return {"upstream": u.upstream, "member": u.member, "credential": u.credential,
            "pulls_6h": u.pulls_6h, "pulls_24h": u.pulls_24h, "heads_6h": u.heads_6h,
            "blob_bytes_24h": u.blob_bytes_24h, "limit": u.limit, "remaining": u.remaining,
            "window": u.window, "source": u.source, "seen": u.seen}


# Rendering

def size(n: Optional[float]) -> str:
    """Bytes as a person reads them: 1.5 GiB."""
    if n is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _opt(value) -> str:
    """A figure that may be unknown."""
    return "unknown" if value is None else str(value)


def _ratio(value: Optional[float]) -> str:
    return "no lookups yet" if value is None else f"{value * 100:.1f}%"


#: A CSS class per health state (a fixed set; anything new is "other").
STATE_CLASSES = {"up": "up", "failing": "failing", "open": "open", "rate limited": "limited"}

#: The chart's drawing box: 24 bars of BAR units each.
BAR, CHART_HEIGHT = 10, 60

# No ">" or "&" in the CSS: the template escapes text, and a style
# element's text is not unescaped by browsers.
TEMPLATE = """\
<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" lang="en">
<head>
  <meta charset="utf-8"/>
  <meta name="viewport" content="width=device-width, initial-scale=1"/>
  <title>regcache status</title>
  <style>
    body { font-family: system-ui, sans-serif; margin: 0; padding: 1rem; background: #f4f5f7; color: #1d2330; }
    h1 { font-size: 1.3rem; margin: 0 0 1rem; }
    h2 { font-size: 1rem; margin: 0 0 .5rem; color: #46506a; }
    .grid { display: grid; gap: 1rem; grid-template-columns: repeat(auto-fit, minmax(17rem, 1fr)); }
    section { background: #fff; border-radius: .5rem; padding: 1rem; box-shadow: 0 1px 2px #0002; min-width: 0; }
    section.wide { grid-column: 1 / -1; }
    .figure { font-size: 2rem; font-weight: 600; }
    .of { color: #667; }
    svg { width: 100%; height: 4rem; display: block; margin-top: .5rem; }
    rect { fill: #3d6fd6; }
    rect.empty { fill: #dde3ef; }
    .scroll { overflow-x: auto; }
    table { border-collapse: collapse; width: 100%; font-size: .9rem; }
    th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #e3e6ec; vertical-align: top; }
    td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
    code { word-break: break-all; font-size: .8rem; }
    progress, meter { width: 100%; }
    .state { font-weight: 600; padding: .1rem .4rem; border-radius: .3rem; white-space: nowrap; }
    .up { background: #dcf5e3; color: #17602e; }
    .failing { background: #fff1cc; color: #7a5400; }
    .open, .limited { background: #fde0df; color: #8c1d18; }
    .other { background: #e6e8ee; }
    footer { margin-top: 1rem; font-size: .8rem; color: #667; }
    @media (max-width: 30rem) { body { padding: .5rem; } .figure { font-size: 1.6rem; } th, td { padding: .25rem; } }
  </style>
</head>
<body t:render="page">
  <h1>regcache status</h1>
  <div class="grid">
    <section id="docker-hub">
      <h2>Docker Hub pulls</h2>
      <div><span class="figure" id="pulls-6h"><t:attr name="data-value"><t:slot name="pulls_6h"/></t:attr><t:slot name="pulls_6h"/></span>
        <span class="of"> in 6 h, of a limit of <span id="limit"><t:attr name="data-value"><t:slot name="limit_value"/></t:attr><t:slot name="limit"/></span></span></div>
      <div><span id="pulls-24h"><t:attr name="data-value"><t:slot name="pulls_24h"/></t:attr><t:slot name="pulls_24h"/></span> in 24 h;
        <span id="remaining"><t:attr name="data-value"><t:slot name="remaining_value"/></t:attr><t:slot name="remaining"/></span> left</div>
      <svg id="hourly" role="img" preserveAspectRatio="none"><t:attr name="viewBox">0 0 240 <t:slot name="chart_height"/></t:attr><title>Counted pulls per hour, the last 24 hours, the current hour last</title><t:transparent t:render="bars"/></svg>
    </section>
    <section id="cache">
      <h2>Cache</h2>
      <div class="figure" id="hit-ratio"><t:attr name="data-value"><t:slot name="hit_ratio_value"/></t:attr><t:slot name="hit_ratio"/></div>
      <div class="of">hit ratio: <t:slot name="hits"/> hits, <t:slot name="misses"/> misses</div>
      <div>Saved <span id="bytes-saved"><t:attr name="data-value"><t:slot name="saved_value"/></t:attr><t:slot name="saved"/></span> of upstream traffic
        (<t:slot name="served"/> served, <t:slot name="fetched"/> fetched)</div>
    </section>
    <section id="levels">
      <h2>Levels</h2>
      <div><span class="figure" id="local-hits"><t:attr name="data-value"><t:slot name="local_hits"/></t:attr><t:slot name="local_hits"/></span>
        <span class="of"> answered by this replica's store</span></div>
      <t:transparent t:render="shared_level"/>
    </section>
    <section id="store">
      <h2>Store</h2>
      <div class="figure" id="store-bytes"><t:attr name="data-value"><t:slot name="store_value"/></t:attr><t:slot name="store"/></div>
      <div class="of">of <span id="store-limit"><t:attr name="data-value"><t:slot name="store_limit_value"/></t:attr><t:slot name="store_limit"/></span>; <t:slot name="evicted"/> evicted</div>
      <meter t:render="store_meter" min="0" max="1"/>
    </section>
    <section id="credentials" class="wide">
      <h2>Quota per credential</h2>
      <div class="scroll"><table>
        <thead><tr><th>upstream</th><th>member</th><th>credential</th><th class="num">pulls 6 h</th><th class="num">pulls 24 h</th><th class="num">free checks 6 h</th><th class="num">limit</th><th class="num">remaining</th><th>seen</th></tr></thead>
        <tbody><tr t:render="credentials" class="credential">
          <t:attr name="data-credential"><t:slot name="credential"/></t:attr>
          <td><t:slot name="upstream"/></td><td><t:slot name="member"/></td><td><t:slot name="credential"/></td>
          <td class="num"><t:slot name="pulls_6h"/></td><td class="num"><t:slot name="pulls_24h"/></td>
          <td class="num"><t:slot name="heads_6h"/></td><td class="num"><t:slot name="limit"/></td>
          <td class="num"><t:attr name="data-value"><t:slot name="remaining_value"/></t:attr><t:slot name="remaining"/></td>
          <td><t:slot name="seen"/></td>
        </tr></tbody>
      </table></div>
    </section>
    <section id="downloads" class="wide">
      <h2>Downloads in flight</h2>
      <div class="scroll"><table>
        <thead><tr><th>repository</th><th>blob</th><th>progress</th><th class="num">clients</th></tr></thead>
        <tbody><tr t:render="downloads" class="download">
          <td><t:slot name="upstream"/>/<t:slot name="repository"/></td><td><code><t:slot name="digest"/></code></td>
          <td><t:slot name="bar"/> <t:slot name="done"/></td><td class="num"><t:slot name="clients"/></td>
        </tr></tbody>
      </table></div>
    </section>
    <section id="top-images">
      <h2>Most pulled</h2>
      <div class="scroll"><table><tbody><tr t:render="top_images" class="image">
        <td><t:slot name="name"/></td><td class="num image-pulls"><t:attr name="data-value"><t:slot name="pulls"/></t:attr><t:slot name="pulls"/></td>
      </tr></tbody></table></div>
    </section>
    <section id="upstreams">
      <h2>Upstreams</h2>
      <div class="scroll"><table><tbody><tr t:render="upstreams" class="member">
        <t:attr name="data-state"><t:slot name="state"/></t:attr>
        <td><t:slot name="upstream"/><br/><t:slot name="member"/></td>
        <td><span><t:attr name="class">state <t:slot name="class"/></t:attr><t:slot name="state"/></span> <t:slot name="detail"/></td>
      </tr></tbody></table></div>
    </section>
  </div>
  <footer>regcache <t:slot name="version"/>, <t:slot name="time"/>. The same figures for scripts: <a href="status.json">status.json</a>.</footer>
</body>
</html>
"""


def _none_row(columns: int, text: str) -> Tag:
    return tags.tr(tags.td(text, colspan=str(columns), class_="none"))


def _data(value) -> str:
    """A ``data-value``: the raw figure, empty when unknown."""
    return "" if value is None else str(value)


class _Page(Element):
    loader = XMLString(TEMPLATE)

    def __init__(self, data: dict):
        super().__init__()
        self.data = data

    @renderer
    def page(self, request, tag):
        d = self.data
        hub, cache, moved, store = d["docker_hub"], d["cache"], d["bytes"], d["store"]
        return tag.fillSlots(
            pulls_6h=str(hub["pulls_6h"]), pulls_24h=str(hub["pulls_24h"]),
            limit=_opt(hub["limit"]), limit_value=_data(hub["limit"]),
            remaining=_opt(hub["remaining"]), remaining_value=_data(hub["remaining"]),
            chart_height=str(CHART_HEIGHT),
            hit_ratio=_ratio(cache["hit_ratio"]), hit_ratio_value=_data(cache["hit_ratio"]),
            hits=str(cache["hits"]), misses=str(cache["misses"]),
            local_hits=str(d["levels"]["local"]["hits"]),
            saved=size(moved["saved"]), saved_value=str(moved["saved"]),
            served=size(moved["served"]), fetched=size(moved["fetched"]),
            store=size(store["bytes"]), store_value=str(store["bytes"]),
            store_limit=size(store["limit"]), store_limit_value=_data(store["limit"]),
            evicted=str(store["evicted"]), version=d["version"], time=_when(d["time"]),
        )

    @renderer
    def shared_level(self, request, tag):
        shared = self.data["levels"]["shared"]
        if shared is None:
            return tags.div("Local level only: no shared bucket (--storage-backend local).", id="no-shared")

        def figure(id_: str, value) -> Tag:
            return tags.span(_opt(value), id=id_, **{"data-value": _data(value)})

        return [
            tags.div(figure("bucket-hits", shared["hits"]), " from the shared bucket, ",
                     figure("bucket-misses", shared["misses"]), " missed there, ",
                     figure("bucket-failed", shared["failed"]), " failed or late"),
            tags.div(figure("bucket-uploads", shared["uploads"]), " shared with the other replicas, ",
                     figure("bucket-upload-failures", shared["upload_failures"]), " not"),
            tags.div(figure("leases-won", shared["leases_won"]), " downloads this replica led, ",
                     figure("forwarded", shared["forwarded"]), " requests forwarded to the replica leading one"),
        ]

    @renderer
    def bars(self, request, tag):
        hourly = self.data["docker_hub"]["hourly"]
        top = max(max(hourly), 1)
        bars = []
        for i, pulls in enumerate(hourly):
            height = max(round(pulls / top * (CHART_HEIGHT - 4)), 1)
            ago = len(hourly) - 1 - i
            bars.append(Tag("rect", attributes={
                "x": str(i * BAR + 1), "y": str(CHART_HEIGHT - height), "width": str(BAR - 2),
                "height": str(height), "data-pulls": str(pulls), "class": "bar" if pulls else "empty",
            }, children=[Tag("title", children=[f"{pulls} pulls, {'this hour' if not ago else f'{ago} h ago'}"])]))
        return bars

    @renderer
    def store_meter(self, request, tag):
        ratio = self.data["store"]["used_ratio"]
        return tag(value=str(min(ratio, 1.0))) if ratio is not None else ""

    @renderer
    def credentials(self, request, tag):
        rows = [
            tag.clone().fillSlots(
                upstream=u["upstream"], member=u["member"], credential=u["credential"],
                pulls_6h=str(u["pulls_6h"]), pulls_24h=str(u["pulls_24h"]), heads_6h=str(u["heads_6h"]),
                limit=_opt(u["limit"]), remaining=_opt(u["remaining"]), remaining_value=_data(u["remaining"]),
                seen=_when(u["seen"]),
            )
            for u in self.data["credentials"]
        ]
        return rows or _none_row(9, "No pulls counted yet.")

    @renderer
    def downloads(self, request, tag):
        rows = []
        for f in self.data["downloads"]:
            total = f["total"]
            if total:
                bar, done = tags.progress(value=str(f["bytes"]), max=str(total)), f"{size(f['bytes'])} of {size(total)}"
            else:
                bar, done = tags.progress(), f"{size(f['bytes'])} so far"
            rows.append(tag.clone().fillSlots(
                upstream=f["upstream"], repository=f["repository"], digest=f["digest"], bar=bar, done=done,
                clients=str(f["clients"]),
            ))
        return rows or _none_row(4, "Nothing downloading.")

    @renderer
    def top_images(self, request, tag):
        rows = [tag.clone().fillSlots(name=i["name"], pulls=str(i["pulls"])) for i in self.data["top_images"]]
        return rows or _none_row(2, "No pulls yet.")

    @renderer
    def upstreams(self, request, tag):
        return [
            tag.clone().fillSlots(upstream=m["upstream"], member=m["member"], state=m["state"],
                                  detail=m["detail"] or "", **{"class": STATE_CLASSES.get(m["state"], "other")})
            for m in self.data["upstreams"]
        ]
