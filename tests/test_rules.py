# test-case-name: tests.test_rules
"""
The pull policy: every outcome of the rules (order, globs, tags, digests,
users and groups, the default), the config file's refusals of bad rules,
and the routes refusing a denied pull with nothing looked up or fetched.
"""

import json
import os
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from regcache.config import ConfigError, load
from regcache.errors import RegistryError
from regcache.identity import EVERYONE, Identity
from regcache.metrics import Metrics
from regcache.policy import Registry, Route
from regcache.rules import PullRules, tag_regex
from tests.support import HubRig

UPSTREAMS = """\
upstreams:
  - name: docker.io
    urls: [https://registry-1.docker.io]
  - name: ghcr
    hosts: [ghcr.io]
    urls: [https://ghcr.io]
"""


def config_file(policy: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="regcache-rules-")
    with os.fdopen(fd, "w") as f:
        f.write(UPSTREAMS + "policy:\n" + textwrap.indent(textwrap.dedent(policy), "  "))
    return path


def rule_sets(policy: str):
    path = config_file(policy)
    try:
        return load({"config": path}, {}).policy
    finally:
        os.unlink(path)


def refusal(policy: str) -> str:
    path = config_file(policy)
    try:
        with SynchronousTestCase().assertRaises(ConfigError) as e:
            load({"config": path}, {})
        message = str(e.exception)
        assert message.startswith(path + ":"), message
        return message[len(path) + 1:]
    finally:
        os.unlink(path)


def decide(sets, name, sort="tag", tag="1", client=EVERYONE):
    """(allowed, deciding rule index or "default") for one pull."""
    d = sets[0].decide(name, client, sort, tag)
    return d.allowed, d.label


class RuleOutcomeTests(SynchronousTestCase):
    def test_first_matching_rule_wins(self):
        """Rules are tried in order and the first that matches decides, a later one never overrides it."""
        sets = rule_sets("""\
            docker.io:
              default: allow
              rules:
                - deny: library/secret
                - allow: library/*
                - deny: library/alpine
            """)
        self.assertEqual(decide(sets, "library/secret"), (False, "0"))
        self.assertEqual(decide(sets, "library/alpine"), (True, "1"))
        self.assertEqual(decide(sets, "bitnami/redis"), (True, "default"))

    def test_default_applies_when_no_rule_matches(self):
        """A pull no rule matches gets the upstream's default, allow or deny."""
        for default, allowed in (("allow", True), ("deny", False)):
            sets = rule_sets(f"docker.io:\n  default: {default}\n  rules: [{{allow: library/*}}]\n")
            self.assertEqual(decide(sets, "myname/app"), (allowed, "default"))
        self.assertEqual(decide(rule_sets("docker.io: {default: deny}\n"), "library/alpine"), (False, "default"))

    def test_star_stays_within_one_component_and_double_star_crosses(self):
        """``*`` and ``?`` match within one path component, ``**`` across any number of them."""
        sets = rule_sets("""\
            docker.io:
              default: deny
              rules:
                - allow: library/*
                - allow: myorg/**
                - allow: team/app-?
                - allow: "**/mirror"
            """)
        for name, allowed in (("library/alpine", True), ("library/a/b", False), ("myorg/app", True),
                              ("myorg/a/b/c", True), ("myorgx/app", False), ("team/app-1", True),
                              ("team/app-10", False), ("a/b/mirror", True), ("library/alpinex/y", False)):
            self.assertEqual(decide(sets, name)[0], allowed, name)

    def test_tag_globs_and_regexes_match_whole_tags(self):
        """A tag glob or ``/regex/`` narrows a rule to the tags it matches, whole, never a part of one."""
        sets = rule_sets("""\
            docker.io:
              default: deny
              rules:
                - allow: library/*
                  tags: ["3.*", "/v[0-9]+(\\\\.[0-9]+)*/"]
            """)
        for tag, allowed in (("3.19", True), ("3", False), ("v1.2.3", True), ("v1.x", False), ("latest", False),
                             ("xv1", False), ("13.1", False)):
            self.assertEqual(decide(sets, "library/alpine", tag=tag)[0], allowed, tag)

    def test_a_pathological_regex_cannot_backtrack(self):
        """A regex that would backtrack exponentially in Python's re is matched by RE2 in one pass."""
        matcher = __import__("re2").compile(tag_regex("/(a|a)*b/"))
        self.assertIsNone(matcher.fullmatch("a" * 128))
        self.assertIsNotNone(matcher.fullmatch("a" * 127 + "b"))

    def test_a_deny_narrowed_to_tags_leaves_digests_and_blobs_to_later_rules(self):
        """``deny latest`` refuses the tag; pulls by digest and blobs, shared with other tags, go on."""
        sets = rule_sets("""\
            docker.io:
              default: deny
              rules:
                - deny: library/*
                  tags: latest
                - allow: library/*
            """)
        self.assertEqual(decide(sets, "library/alpine", tag="latest"), (False, "0"))
        self.assertEqual(decide(sets, "library/alpine", tag="3"), (True, "1"))
        self.assertEqual(decide(sets, "library/alpine", "digest"), (True, "1"))
        self.assertEqual(decide(sets, "library/alpine", "content"), (True, "1"))

    def test_an_allow_narrowed_to_tags_allows_what_those_tags_need(self):
        """An allow of some tags allows the digests and blobs its tags pull; other tags fall through."""
        sets = rule_sets("""\
            docker.io:
              default: deny
              rules:
                - allow: bitnami/*
                  tags: "1.*"
            """)
        self.assertEqual(decide(sets, "bitnami/redis", tag="1.2"), (True, "0"))
        self.assertEqual(decide(sets, "bitnami/redis", tag="2.0"), (False, "default"))
        self.assertEqual(decide(sets, "bitnami/redis", "digest"), (True, "0"))
        self.assertEqual(decide(sets, "bitnami/redis", "content"), (True, "0"))
        self.assertEqual(decide(sets, "other/redis", "content"), (False, "default"))

    def test_digest_only_rules(self):
        """``tags: false`` matches pulls by digest only; ``digests: false`` only pulls by tag."""
        sets = rule_sets("""\
            docker.io:
              default: deny
              rules:
                - allow: pinned/*
                  tags: false
                - allow: tagged/*
                  digests: false
            """)
        self.assertEqual(decide(sets, "pinned/app", "digest"), (True, "0"))
        self.assertEqual(decide(sets, "pinned/app", "content"), (True, "0"))
        self.assertEqual(decide(sets, "pinned/app", tag="v1"), (False, "default"))
        self.assertEqual(decide(sets, "tagged/app", tag="v1"), (True, "1"))
        self.assertEqual(decide(sets, "tagged/app", "digest"), (False, "default"))

    def test_a_deny_of_the_whole_repository_denies_its_blobs_and_tag_lists(self):
        """Blobs and tag lists of a denied repository are denied, whatever a later rule says."""
        sets = rule_sets("""\
            docker.io:
              default: allow
              rules:
                - deny: myorg/secret
                - allow: myorg/**
            """)
        for sort in ("content", "digest", "tag"):
            self.assertEqual(decide(sets, "myorg/secret", sort), (False, "0"), sort)
        self.assertEqual(decide(sets, "myorg/public", "content"), (True, "1"))

    def test_users_and_groups_narrow_a_rule_to_those_clients(self):
        """A rule with users or groups matches only those clients; anonymous and trusted are built-in groups."""
        sets = rule_sets("""\
            docker.io:
              default: deny
              rules:
                - allow: myorg/**
                  users: [ci]
                - allow: team/**
                  groups: [developers]
                - allow: library/*
                  groups: [anonymous, trusted]
                - deny: library/*
            """)
        ci = Identity(user="ci")
        dev = Identity(user="dana", groups=frozenset({"developers"}))
        node = Identity(trusted=True, address="10.0.0.7")
        stranger = Identity(address="203.0.113.9")
        self.assertEqual(decide(sets, "myorg/app", client=ci), (True, "0"))
        self.assertEqual(decide(sets, "myorg/app", client=dev), (False, "default"))
        self.assertEqual(decide(sets, "team/app", client=dev), (True, "1"))
        self.assertEqual(decide(sets, "team/app", client=ci), (False, "default"))
        self.assertEqual(decide(sets, "library/alpine", client=node), (True, "2"))
        self.assertEqual(decide(sets, "library/alpine", client=stranger), (True, "2"))
        self.assertEqual(decide(sets, "library/alpine", client=ci), (False, "3"))
        self.assertEqual(decide(sets, "library/alpine", client=Identity(user="t", trusted=True)), (True, "2"))

    def test_each_upstream_has_its_own_rules(self):
        """A policy names one upstream; another upstream without a policy allows everything."""
        pulls = PullRules(rule_sets("ghcr: {default: deny}\n"), Metrics())
        ghcr, hub = (Registry(name, frozenset(), None, 60, None) for name in ("ghcr", "docker.io"))
        with self.assertRaises(RegistryError) as e:
            pulls.check(Route(ghcr, "owner/app"), "manifests", "v1")
        self.assertEqual((e.exception.code, e.exception.status), ("DENIED", 403))
        self.assertIsNone(pulls.check(Route(hub, "owner/app"), "manifests", "v1"))


class BadRuleTests(SynchronousTestCase):
    def test_bad_rules_stop_start_up_naming_file_line_and_key(self):
        """Every malformed rule is one line naming the file, the line and the key at fault."""
        cases = [
            ("docker.io:\n  default: deny\n  rules:\n    - allow: library/[a-z]\n", "11",
             "policy.docker.io.rules[0].allow: 'library/[a-z]' has characters"),
            ("docker.io:\n  default: deny\n  rules:\n    - allow: [library/*, 'x/***']\n", "11",
             "policy.docker.io.rules[0].allow[1]: 'x/***': use * or ** only"),
            ("docker.io:\n  default: deny\n  rules:\n    - allow: library/*\n      tags: /(a)\\1/\n", "12",
             "policy.docker.io.rules[0].tags: not a regular expression RE2 accepts"),
            ("docker.io:\n  default: deny\n  rules:\n    - allow: library/*\n      tags: '/(?=a)/'\n", "12",
             "policy.docker.io.rules[0].tags: not a regular expression RE2 accepts"),
            ("docker.io:\n  default: deny\n  rules:\n    - allow: alpine\n", "11",
             "policy.docker.io.rules[0].allow: 'alpine' matches no Docker Hub repository"),
            ("docker.io:\n  default: deny\n  rules:\n    - {allow: a/b, deny: a/c}\n", "11",
             "policy.docker.io.rules[0]: give exactly one of allow, deny"),
            ("docker.io:\n  default: deny\n  rules:\n    - {tags: v1}\n", "11",
             "policy.docker.io.rules[0]: give exactly one of allow, deny"),
            ("docker.io:\n  default: deny\n  rules:\n    - {allow: a/b, tags: false, digests: false}\n", "11",
             "policy.docker.io.rules[0].digests: with tags: false as well the rule matches no pull"),
            ("docker.io:\n  default: deny\n  rules:\n    - {allow: a/b, when: always}\n", "11",
             "policy.docker.io.rules[0].when: unknown key"),
            ("docker.io:\n  default: maybe\n", "9", "policy.docker.io.default: 'maybe' is not one of"),
            ("docker.io:\n  rules: []\n", "9", "policy.docker.io: 'default' is required"),
            ("quay:\n  default: deny\n", "8", "policy.quay: no upstream is named 'quay'"),
            ("docker.io:\n  default: deny\n  rules:\n    - allow: library/*\n      tags: '/" + "a" * 400 + "/'\n",
             "12", "policy.docker.io.rules[0].tags"),
        ]
        for policy, line, fragment in cases:
            message = refusal(policy)
            self.assertNotIn("\n", message)
            self.assertTrue(message.startswith(f"{line}: {fragment}"), (policy, message))

    def test_no_policy_allows_everything(self):
        """A config file without a policy, or no file at all, has no rules: every pull is allowed."""
        path = config_file("{}\n")
        try:
            self.assertEqual(load({"config": path}, {}).policy, ())
        finally:
            os.unlink(path)
        self.assertEqual(load({}, {}).policy, ())


class DeniedRequestTests(SynchronousTestCase):
    """A denied pull, through the routes with the real upstream client and the in-memory fake Hub."""

    def setUp(self):
        self.rig = HubRig()
        self.image = self.rig.images["library/small:1"]

    def deny(self, policy):
        self.rig.policy.pulls.replace(rule_sets(policy))

    def upstream_requests(self):
        stats = self.rig.stats()
        return (stats["token_requests"], stats["pings"], stats["manifest_gets_total"], stats["manifest_heads_total"],
                stats["registry_blob_gets_total"], stats["cdn_blob_gets_total"],
                sum(stats["referrers_gets"].values()), len(self.rig.hub.requests))

    def paths(self):
        small = self.image
        return [f"/v2/small/manifests/1", f"/v2/library/small/manifests/{small.digest}",
                f"/v2/library/small/blobs/{small.layers[0].digest}", "/v2/library/small/tags/list",
                f"/v2/library/small/referrers/{small.digest}"]

    def test_denied_pulls_are_403_denied_naming_the_rule_with_nothing_fetched(self):
        """Manifest by tag and digest, blob, tag list and referrers of a denied name: 403 DENIED, upstream untouched."""
        self.deny("docker.io:\n  default: allow\n  rules:\n    - allow: library/alpine\n    - deny: library/*\n")
        before = self.upstream_requests()
        for path in self.paths():
            for method in ("GET", "HEAD"):
                c = self.rig.get(path, method)
                self.assertEqual(c.status(), 403, (method, path))
                if method == "GET":
                    error = json.loads(c.body())["errors"][0]
                    self.assertEqual(error["code"], "DENIED")
                    self.assertIn("rule 1 ('library/*')", error["message"])
        self.assertEqual(self.upstream_requests(), before)
        self.assertEqual(before[-1], 0)
        text = self.rig.metrics.render().decode()
        self.assertIn('regcache_policy_denials_total{rule="1",upstream="docker.io"} 10.0', text)

    def test_a_push_to_a_denied_name_is_refused_as_a_push(self):
        """A push is refused as a push (405, the mirror is read-only) whatever the policy says of the name."""
        self.deny("docker.io:\n  default: deny\n")
        c = self.rig.get("/v2/library/small/manifests/1", "PUT")
        self.assertEqual(c.status(), 405)
        self.assertEqual(json.loads(c.body())["errors"][0]["code"], "UNSUPPORTED")

    def test_nothing_cached_is_served_for_a_denied_name(self):
        """What was cached while allowed is refused once the name is denied, and served again once allowed."""
        small = self.image
        for path in self.paths():
            self.assertIn(self.rig.get(path).status(), (200,), path)
        before = self.upstream_requests()
        self.deny("docker.io:\n  default: deny\n")
        for path in self.paths():
            c = self.rig.get(path)
            self.assertEqual((c.status(), json.loads(c.body())["errors"][0]["code"]), (403, "DENIED"), path)
            self.assertIn("no rule allows it", c.body().decode())
        self.assertEqual(self.upstream_requests(), before)
        self.deny("docker.io:\n  default: allow\n")
        c = self.rig.get(f"/v2/library/small/blobs/{small.layers[0].digest}")
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))

    def test_a_short_name_is_judged_by_its_upstream_name(self):
        """A client's ``small`` is Docker Hub's ``library/small``, so ``library/*`` rules decide it."""
        self.deny("docker.io:\n  default: deny\n  rules:\n    - allow: library/*\n")
        self.assertEqual(self.rig.get("/v2/small/manifests/1").status(), 200)
        self.deny("docker.io:\n  default: allow\n  rules:\n    - deny: library/*\n")
        c = self.rig.get("/v2/small/manifests/1")
        self.assertEqual(c.status(), 403)
        self.assertIn("library/small:1", c.body().decode())

    def test_an_allowed_pull_is_untouched(self):
        """Under a policy that allows it, a pull is served as without one."""
        self.deny("docker.io:\n  default: deny\n  rules:\n    - allow: library/small\n      tags: '1'\n")
        c = self.rig.get("/v2/library/small/manifests/1")
        self.assertEqual((c.status(), c.header("Docker-Content-Digest")), (200, self.image.digest))
        c = self.rig.get(f"/v2/library/small/blobs/{self.image.layers[0].digest}")
        self.assertEqual(c.status(), 200)
        self.assertEqual(self.rig.get("/v2/library/small/manifests/2").status(), 403)


class ExampleConfigTests(SynchronousTestCase):
    def test_the_example_follows_the_seed(self):
        """docs/regcache.example.yaml allows Docker Official Images and the trusted organisations, denies the rest."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = load({"config": os.path.join(root, "docs", "regcache.example.yaml")},
                      {"GHCR_TOKEN": "x", "QUAY_PASSWORD": "y"})
        hub = next(s for s in config.policy if s.upstream == "dockerhub")
        sets = [hub]
        self.assertEqual(decide(sets, "library/ubuntu", tag="20.04"), (True, "0"))
        self.assertEqual(decide(sets, "bitnami/redis", tag="7.2"), (True, "1"))
        self.assertEqual(decide(sets, "grafana/grafana", "content"), (True, "1"))
        for sort in ("tag", "digest", "content"):
            self.assertEqual(decide(sets, "myname/app", sort), (False, "default"), sort)
