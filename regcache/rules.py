# test-case-name: tests.test_rules
"""
The pull policy: ordered allow and deny rules per upstream, first match
wins, compiled once when the config file is read.

A rule names repositories as the upstream names them, after Docker Hub's
``library/`` rewrite, so a client's ``alpine`` is ``library/alpine`` and
matches ``library/*``.  Globs: ``*`` and ``?`` stay within one path
component, ``**`` crosses them (``myorg/**``).  Tags are globs too, or a
regular expression written ``/regex/``, always matched whole.  Every
pattern is compiled with RE2, whose matching time is linear in the input:
an operator's regex can be wrong, never slow enough to stall the reactor.

A registry request is one of three sorts, and rules apply to them thus:

- by tag (a manifest by tag): the first rule whose repositories, client
  and ``tags`` match decides; ``tags: false`` makes a rule match no tag;
- by digest (a manifest by digest, referrers of a digest): the first rule
  whose repositories and client match and that has ``digests`` decides;
  ``digests`` is true unless the rule is a deny narrowed by ``tags``,
  which denies those tags, not the content they share with others;
- content (a blob, a tag list), which has neither: the first rule that
  allows any pull of the repository, or denies every pull of it, decides.
  A narrowed allow allows its blobs because the pulls it allows need them;
  a narrowed deny leaves them to later rules for the same reason.

No rule deciding means the upstream's ``default``.  An upstream without a
policy allows everything, as before pull policies existed.
"""

from dataclasses import dataclass
from typing import FrozenSet, Mapping, Optional, Sequence, Tuple

import re2
from twisted.logger import Logger

from regcache.errors import RegistryError
from regcache.reference import is_digest

#: Longest pattern accepted: tags are at most 128 characters and names 255,
#: so anything longer is a mistake, and RE2's memory stays small.
MAX_PATTERN = 300

#: Groups every client may be in without client authentication naming them.
ANONYMOUS = "anonymous"
TRUSTED = "trusted"

_NAME_GLOB = re2.compile(r"[a-z0-9._/*?-]+")
_TAG_GLOB = re2.compile(r"[A-Za-z0-9_.*?-]+")


def _options():
    options = re2.Options()
    # A bad pattern is reported in the config error; RE2 must not also
    # print it to stderr.
    options.log_errors = False
    return options


class PatternError(ValueError):
    """A pattern regcache cannot compile, in words for the config error."""


def _compile(regex: str):
    try:
        return re2.compile(regex, _options())
    except re2.error as e:
        why = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(f"not a regular expression RE2 accepts ({why}; no backreferences or lookarounds)") from None


def _glob(pattern: str, allowed, one: str, many: Optional[str]) -> str:
    if not pattern or len(pattern) > MAX_PATTERN:
        raise PatternError(f"a pattern must have 1 to {MAX_PATTERN} characters")
    if not allowed.fullmatch(pattern):
        raise PatternError(f"{pattern[:80]!r} has characters no name or tag can have")
    if "***" in pattern or (many is None and "**" in pattern):
        raise PatternError(f"{pattern[:80]!r}: use * or ** only")
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(many)
            i += 2
        elif pattern[i] == "*":
            out.append(one + "*")
            i += 1
        elif pattern[i] == "?":
            out.append(one)
            i += 1
        else:
            out.append(re2.escape(pattern[i]))
            i += 1
    return "".join(out)


def name_regex(pattern: str) -> str:
    """A repository glob as an RE2 expression: ``*`` within a component, ``**`` across."""
    return _glob(pattern, _NAME_GLOB, "[^/]", ".*")


def tag_regex(pattern: str) -> str:
    """A tag glob, or ``/regex/``, as an RE2 expression matched whole."""
    if len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
        regex = pattern[1:-1]
        if not regex or len(regex) > MAX_PATTERN:
            raise PatternError(f"a regular expression must have 1 to {MAX_PATTERN} characters")
        _compile(regex)
        return f"(?:{regex})"
    return _glob(pattern, _TAG_GLOB, ".", None)


def _union(regexes: Sequence[str]):
    return _compile("|".join(f"(?:{r})" for r in regexes))


@dataclass(frozen=True, eq=False)
class Rule:
    """
    One rule as the config file wrote it (``names``, ``tags``) and
    compiled.  ``tags`` None matches every tag, () none (``tags: false``).
    """

    index: int
    allow: bool
    names: Tuple[str, ...]
    tags: Optional[Tuple[str, ...]]
    digests: bool
    users: FrozenSet[str]
    groups: FrozenSet[str]

    def __post_init__(self):
        object.__setattr__(self, "_names", [_compile(name_regex(n)) for n in self.names])
        object.__setattr__(self, "_tags", _union([tag_regex(t) for t in self.tags]) if self.tags else None)

    @property
    def whole(self) -> bool:
        """Whether the rule matches every pull of its repositories."""
        return self.tags is None and self.digests

    def matches_client(self, client) -> bool:
        if not self.users and not self.groups:
            return True
        if client.user is not None and client.user in self.users:
            return True
        groups = set(client.groups)
        if client.anonymous:
            groups.add(ANONYMOUS)
        if client.trusted:
            groups.add(TRUSTED)
        return bool(groups & self.groups)

    def matching_name(self, name: str) -> Optional[str]:
        """The pattern that matches ``name``, if one does."""
        return next((p for p, r in zip(self.names, self._names) if r.fullmatch(name)), None)

    def matches_tag(self, tag: str) -> bool:
        if self.tags is None:
            return True
        return self._tags is not None and self._tags.fullmatch(tag) is not None

    def decides(self, sort: str, tag: Optional[str]) -> bool:
        if sort == "tag":
            return self.matches_tag(tag)
        if sort == "digest":
            return self.digests
        return self.allow or self.whole


@dataclass(frozen=True)
class Decision:
    """Whether a pull may go on, and the rule that said so (None: the default)."""

    allowed: bool
    rule: Optional[Rule] = None
    pattern: Optional[str] = None

    @property
    def label(self) -> str:
        return "default" if self.rule is None else str(self.rule.index)


@dataclass(frozen=True, eq=False)
class RuleSet:
    """One upstream's rules, in order, and what applies when none decides."""

    upstream: str
    rules: Tuple[Rule, ...]
    default_allow: bool

    def decide(self, name: str, client, sort: str, tag: Optional[str] = None) -> Decision:
        for rule in self.rules:
            if not rule.matches_client(client):
                continue
            pattern = rule.matching_name(name)
            if pattern is not None and rule.decides(sort, tag):
                return Decision(rule.allow, rule, pattern)
        return Decision(self.default_allow)


def sort_of(kind: str, reference: str) -> Tuple[str, Optional[str]]:
    """
    A route's kind and reference as the rules see them: a pull by tag
    (with its tag), by digest, or of content.
    """
    if kind == "manifests":
        return ("digest", None) if is_digest(reference) else ("tag", reference)
    if kind == "referrers":
        return "digest", None
    return "content", None


class PullRules:
    """
    The rules in force, for every upstream that has some.  ``replace``
    swaps them all at once (a reload), so a request sees either the old
    rules or the new ones, never a mixture.
    """

    log = Logger()

    def __init__(self, sets: Sequence[RuleSet] = (), metrics=None):
        self.metrics = metrics
        self.replace(sets)

    def replace(self, sets: Sequence[RuleSet]) -> None:
        self._sets: Mapping[str, RuleSet] = {s.upstream: s for s in sets}

    def allows(self, upstream: str, name: str, client) -> bool:
        """
        Whether ``client`` may pull anything of ``name`` on ``upstream``:
        what may be shown to it by name (the status page), since a name a
        client may not pull, a private repository's, is itself a secret.
        """
        rules = self._sets.get(upstream)
        return rules is None or rules.decide(name, client, "content").allowed

    def check(self, route, kind: str, reference: str) -> None:
        """
        Raise DENIED if the rules refuse this pull of ``route``; it is then
        counted and logged, naming the rule.
        """
        rules = self._sets.get(route.registry.name)
        if rules is None:
            return
        sort, tag = sort_of(kind, reference)
        decision = rules.decide(route.name, route.client, sort, tag)
        if decision.allowed:
            return
        what = f"{route.name}:{tag}" if tag else route.name
        if decision.rule is None:
            message = f"pulling {what} is denied by the pull policy of {rules.upstream}: no rule allows it"
        else:
            message = (f"pulling {what} is denied by rule {decision.rule.index} "
                       f"({decision.pattern!r}) of the pull policy of {rules.upstream}")
        self.metrics.policy_denials.labels(rules.upstream, decision.label).inc()
        self.log.info("Denied {kind} of {name} for {user} at {address}: rule {rule} of {upstream}", kind=kind,
                      name=what, user=route.client.user or ANONYMOUS, address=route.client.address or "-",
                      rule=decision.label, upstream=rules.upstream)
        raise RegistryError("DENIED", message, status=403)
