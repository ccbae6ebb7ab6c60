# test-case-name: tests.test_config,tests.integration.test_settings_proc
"""
The twistd plugin's options and service maker, and the ``regcache`` command.

This is the edge of the program: the only place (with service.py, which it
calls) that touches the global reactor or the process environment.
"""

import os
import resource
import sys

from twisted import copyright
from twisted.python import usage

from regcache import __version__, config as settings


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A pull-through cache for Docker Hub and other OCI registries. Every option can also be "
        "set in the environment (names in brackets); the command line wins, then the environment, "
        "then the default.\n\n"
        "`regcache verify [--storage DIR]` re-hashes every cached file and removes those that do "
        "not match their digest (exit status 1 if any did), and with --storage-backend s3 every "
        "blob and manifest in the shared bucket; `regcache verify --help` for more.\n\n"
        "`regcache prefetch IMAGE...` warms a running regcache with those images (exit status 1 if "
        "any failed); `regcache prefetch --help` for more."
    )
    optParameters = [
        [s.name, None, None, f"{s.help} [{', '.join(s.env)}]" + (f" (default: {s.default})" if s.default else "")]
        for s in settings.SETTINGS if s.name not in settings.FLAGS
    ]
    optFlags = [[s.name, None, f"{s.help} [{', '.join(s.env)}]"] for s in settings.SETTINGS if s.name in settings.FLAGS]

    def opt_version(self):
        """
        Display regcache's version (and Twisted's) and exit.
        """
        sys.stdout.write(f"regcache {__version__} (Twisted {copyright.version})\n")
        sys.exit(0)


def raise_open_files() -> int:
    """
    Lift the soft open-file limit to the hard one, as nginx's
    worker_rlimit_nofile does: the default soft limit (often 1,024) is far
    below what a busy mirror's connections need.  Returns the limit now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def makeService(options):
    from twisted.internet import reactor

    from regcache import logs
    from regcache.service import build

    raise_open_files()
    cli = {s.name: options[s.name] for s in settings.SETTINGS if s.name not in settings.FLAGS}
    cli.update({name: "yes" if options[name] else None for name in settings.FLAGS})
    try:
        config = settings.load(cli, os.environ)
        service = build(config, reactor, reread=lambda: settings.load(cli, os.environ))
    except settings.ConfigError as e:
        raise SystemExit(f"regcache: {e}")
    if cli.get("password") is not None:
        from twisted.logger import Logger

        Logger().warn("--password is given on the command line, where any local user can read it (ps, "
                      "/proc/PID/cmdline): use --password-file or REGCACHE_PASSWORD instead")
    # twistd's own options (--logfile) are the parent of the plugin's.
    twistd = options.parent or {}
    observer = logs.observer(config.log_format, twistd.get("logfile"))
    return service if observer is None else logs.Observed(service, observer)


def main(argv=None):
    """
    ``regcache [options]``: run the server in the foreground, as
    ``twistd -n --pidfile= regcache [options]`` would.
    ``regcache verify [--storage DIR]``: check the store (regcache.verify).
    ``regcache prefetch IMAGE...``: warm a running regcache (regcache.prefetch).
    """
    from twisted.scripts.twistd import run

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        from regcache.verify import main as verify

        raise SystemExit(verify(argv[1:]))
    if argv[:1] == ["prefetch"]:
        from regcache.prefetch import main as prefetch

        raise SystemExit(prefetch(argv[1:]))
    sys.argv = ["twistd", "-n", "--pidfile=", "regcache", *argv]
    run()
