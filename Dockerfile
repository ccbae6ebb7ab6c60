# regcache: a pull-through cache for Docker Hub and other OCI registries.
#
# BASE is an argument so the image can be built where Docker Hub is out of
# reach: any Debian-like image with python3 and its venv module will do
# (.ci/image-check makes one with debootstrap).  Both stages use the same BASE
# on purpose: the venv's interpreter is a symlink into the base's python.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/regcache

WORKDIR /src
COPY setup.py README.md ./
COPY regcache ./regcache
COPY twisted ./twisted

# pip compiles every .py to .pyc here, so nothing is compiled (or written) at
# run time.  Listing the plugins writes twisted's dropin.cache now, newer than
# every plugin file, so twistd never tries to rewrite it on a read-only root.
RUN /opt/regcache/bin/pip install --no-cache-dir . \
    && /opt/regcache/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && test -s /opt/regcache/lib/python3*/site-packages/twisted/plugins/dropin.cache


FROM ${BASE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="regcache" \
      org.opencontainers.image.description="A pull-through cache (registry mirror) for Docker Hub and other OCI registries, on Twisted" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"

# A named user for uid 1000 keeps tools that look the user up happy; the
# chart and `docker run --user` use the numbers, so nothing depends on it.
RUN groupadd --gid 1000 regcache \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin regcache \
    && mkdir -p /var/lib/registry \
    && chown 1000:1000 /var/lib/registry

COPY --from=build /opt/regcache /opt/regcache

# The store is the only place regcache writes, so the root file system can be
# read-only.  REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY is what registry:2
# users already set; regcache reads it too, and REGCACHE_STORAGE wins.
ENV PATH=/opt/regcache/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REGCACHE_STORAGE=/var/lib/registry

USER 1000:1000
WORKDIR /var/lib/registry
EXPOSE 5000
VOLUME /var/lib/registry

# --pidfile= because a stale twistd.pid would block a restart, and the
# working directory may be read-only.  twistd -n logs to stdout.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "regcache"]
