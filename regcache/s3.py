# test-case-name: tests.test_s3,tests.integration.test_s3_proc
"""
The object-store client of the shared level: S3's XML API, as AWS, GCS
(with an HMAC key) and SeaweedFS speak it.

botocore only signs (SigV4, about 45 µs a request); treq sends, so bodies
stream both ways on the reactor and nothing waits on a socket in a thread.
A streaming upload signs the blob's own sha256, known before the first byte
is sent, so the store can check it (SeaweedFS does not; regcache uploads
only verified files and verifies what it reads back).  Every call has a
deadline and every body read here a size cap; a blob's body is handed to the
caller unread, to stream.

Create-only writes are what leases and uploads rest on: ``If-None-Match: *``
on S3 and SeaweedFS, ``x-goog-if-generation-match: 0`` on GCS, whose XML API
reads If-None-Match only on reads.
"""

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.web.client import readBody
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from regcache.errors import in_words

#: The most of a response body read into memory: an error, a listing, an
#: upload id, a manifest or a tag.  Blobs are streamed, never read here.
MAX_SMALL_BODY = 8 * 1024 * 1024

#: Uploads larger than this go up in parts of this size (S3 allows 10,000
#: parts of at least 5 MiB but the last): a part that fails is sent again
#: alone, and a 100 GiB layer still fits.
PART_SIZE = 64 * 1024 * 1024

#: The slowest an upload may go, in bytes a second: the deadline of a PUT
#: whose body is a file is the usual one plus its size at this rate, since
#: the store answers only once it has every byte.
UPLOAD_FLOOR = 1024 * 1024

#: What one read of a file being uploaded takes, in the store's threads.
READ_SIZE = 1024 * 1024

#: Object metadata (``x-amz-meta-*``) kept with each object, as S3 returns
#: it on HEAD and GET.
META = "x-amz-meta-"

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class StorageError(Exception):
    """
    The object store failed, refused or did not answer in time.  The cache
    goes on without it: a miss, a duplicate fetch, never a failed pull.
    """

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BucketSettings:
    """Where the shared level is, and as whom regcache reaches it."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    #: Prepended to every key, so one bucket can hold other things too.
    prefix: str = ""

    def __repr__(self) -> str:
        return f"BucketSettings({self.endpoint!r}, {self.bucket!r}, prefix={self.prefix!r})"

    @property
    def gcs(self) -> bool:
        return (urlsplit(self.endpoint).hostname or "").endswith("storage.googleapis.com")


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD or GET said of an object."""

    size: int
    etag: str
    metadata: Dict[str, str]


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    #: When it was last written, as the store says it (ISO 8601).
    modified: str


_EMPTY = hashlib.sha256(b"").hexdigest()


@implementer(IBodyProducer)
class _FileRegion:
    """
    ``length`` bytes of a file from ``offset``, read in the store's threads
    (``run``), so an upload never reads the disk on the reactor.
    """

    def __init__(self, path: str, offset: int, length: int, run):
        self.length = length
        self._path = path
        self._offset = offset
        self._run = run
        self._paused: Optional[Deferred] = None
        self._stopped = False

    def startProducing(self, consumer) -> Deferred:
        return Deferred.fromCoroutine(self._produce(consumer))

    async def _produce(self, consumer) -> None:
        fd = await self._run(os.open, self._path, os.O_RDONLY)
        try:
            sent = 0
            while sent < self.length and not self._stopped:
                if self._paused is not None:
                    await self._paused
                    continue
                chunk = await self._run(os.pread, fd, min(READ_SIZE, self.length - sent), self._offset + sent)
                if not chunk:
                    raise StorageError(f"{self._path} ended at byte {self._offset + sent}")
                sent += len(chunk)
                consumer.write(chunk)
        finally:
            await self._run(os.close, fd)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class S3:
    """
    One bucket.  ``http`` is a treq HTTPClient (regcache.upstream_http's,
    so connections are pooled); ``run`` the store's thread runner;
    ``timeout`` the deadline of each exchange up to its response headers
    (and of a small body after them).
    """

    log = Logger()

    def __init__(self, settings: BucketSettings, http, reactor, run, timeout: float = 10.0,
                 part_size: int = PART_SIZE):
        self.settings = settings
        self.part_size = part_size
        self._http = http
        self._reactor = reactor
        self._run = run
        self.timeout = timeout
        # Here, not at the top: only a process with a bucket pays for botocore.
        from regcache import sigv4

        self._sigv4 = sigv4
        self._credentials = sigv4.credentials(settings.access_key, settings.secret_key)
        self._base = settings.endpoint.rstrip("/") + "/" + quote(settings.bucket, safe="")

    # Keys and URLs

    def key(self, name: str) -> str:
        return self.settings.prefix + name

    def url(self, key: str, query: str = "") -> str:
        return self._base + "/" + quote(key, safe="/-_.~") + (("?" + query) if query else "")

    def presign(self, name: str, expires: int = 900) -> str:
        """A GET URL for ``name`` that works without credentials for ``expires`` seconds."""
        return self._sigv4.presign(self._credentials, self.settings.region, self.url(self.key(name)), expires)

    # Exchanges

    def _signed(self, method: str, url: str, headers: Dict[str, str], payload: str) -> Dict[bytes, List[bytes]]:
        signed = self._sigv4.sign(self._credentials, self.settings.region, method, url, headers, payload)
        return {k.encode("latin-1"): [v.encode("latin-1")] for k, v in signed.items()}

    async def _request(self, method: str, key: str, query: str = "", headers: Optional[Dict[str, str]] = None,
                       body=None, payload: str = _EMPTY):
        """
        The response (body unread) of one signed exchange, its headers due
        within the deadline, and for a file's body that long plus the time
        the body may take at UPLOAD_FLOOR.
        """
        url = self.url(key, query)
        signed = self._signed(method, url, headers or {}, payload)
        deadline = self.timeout + (body.length / UPLOAD_FLOOR if isinstance(body, _FileRegion) else 0)
        d = self._http.request(method, url, headers=signed, data=body, allow_redirects=False, unbuffered=True)
        d.addTimeout(deadline, self._reactor)
        try:
            return await d
        except (TimeoutError, CancelledError):
            raise StorageError(f"the object store did not answer {method} {key} within {deadline:g}s")
        except StorageError:
            raise
        except Exception as e:
            if any(r.check(CancelledError) for r in getattr(e, "reasons", ())):
                # A caller's own deadline gave the exchange up: no fault of the store's wire.
                raise StorageError(f"{method} {key} was given up before the object store answered")
            raise StorageError(in_words(f"the object store ({method} {key})", e))

    async def _small(self, response, what: str) -> bytes:
        """A response body of at most MAX_SMALL_BODY, read within the deadline."""
        length = response.length
        if length is not UNKNOWN_LENGTH and length > MAX_SMALL_BODY:
            self._discard(response, give_up=True)
            raise StorageError(f"the object store sent {length} bytes for {what}, more than {MAX_SMALL_BODY}")
        d = readBody(response)
        d.addTimeout(self.timeout, self._reactor)
        try:
            body = await d
        except (TimeoutError, CancelledError):
            raise StorageError(f"the object store did not send {what} within {self.timeout:g}s")
        except Exception as e:
            raise StorageError(in_words(f"the object store ({what})", e))
        if len(body) > MAX_SMALL_BODY:
            raise StorageError(f"the object store sent more than {MAX_SMALL_BODY} bytes for {what}")
        return body

    async def _failed(self, response, what: str) -> StorageError:
        try:
            body = await self._small(response, what)
        except StorageError:
            body = b""
        return StorageError(f"the object store answered {response.code} to {what}: {_error_code(body)}",
                            response.code)

    def _discard(self, response, give_up: bool = False) -> None:
        """Drop a body nobody wants: a small one read within the deadline, any other given up."""
        # A HEAD has no body, whatever length its headers give.
        length = 0 if response.request.method == b"HEAD" else response.length
        response.deliverBody(_Discard(self._reactor, self.timeout, give_up, length))

    def _create_only(self) -> Dict[str, str]:
        return {"x-goog-if-generation-match": "0"} if self.settings.gcs else {"If-None-Match": "*"}

    # Objects

    async def head(self, name: str) -> Optional[ObjectInfo]:
        key = self.key(name)
        response = await self._request("HEAD", key)
        self._discard(response)
        if response.code == 404:
            return None
        if response.code != 200:
            raise StorageError(f"the object store answered {response.code} to HEAD {key}", response.code)
        return _info(response)

    async def open(self, name: str, start: int = 0):
        """
        (ObjectInfo of the whole object, the response with its body unread)
        from byte ``start``, or None if there is no such object.  The
        caller reads or discards the body.
        """
        key = self.key(name)
        headers = {"Range": f"bytes={start}-"} if start else {}
        response = await self._request("GET", key, headers=headers)
        if response.code == 404:
            self._discard(response)
            return None
        if response.code not in (200, 206) or (start and response.code != 206):
            raise await self._failed(response, f"GET {key}")
        info = _info(response)
        if response.code == 206:
            first, total = _range(response)
            if total is None:
                self._discard(response, give_up=True)
                raise StorageError(f"the object store sent a 206 for {key} without the object's size")
            if first != start:
                # Its bytes would land at the wrong place in the blob.
                self._discard(response, give_up=True)
                raise StorageError(f"the object store resumed {key} at the wrong place: byte {first}, not {start}")
            info = ObjectInfo(total, info.etag, info.metadata)
        return info, response

    async def read(self, name: str) -> Optional[Tuple[ObjectInfo, bytes]]:
        """A small object (a manifest, a tag, a lease) whole, or None."""
        opened = await self.open(name)
        if opened is None:
            return None
        info, response = opened
        return info, await self._small(response, f"GET {self.key(name)}")

    async def put(self, name: str, body: bytes, content_type: str = "application/octet-stream",
                  metadata: Optional[Dict[str, str]] = None, create_only: bool = False,
                  if_match: Optional[str] = None) -> bool:
        """
        Write a small object.  False when a condition failed: it exists
        (``create_only``), or its ETag is no longer ``if_match``.
        """
        return await self.put_etag(name, body, content_type, metadata, create_only, if_match) is not None

    async def put_etag(self, name: str, body: bytes, content_type: str = "application/octet-stream",
                       metadata: Optional[Dict[str, str]] = None, create_only: bool = False,
                       if_match: Optional[str] = None) -> Optional[str]:
        """
        As ``put``, but the ETag of what was written (None when a condition
        failed): what a later compare-and-swap names (regcache.leases).
        """
        headers = {"Content-Type": content_type, **_meta(metadata)}
        if create_only:
            headers.update(self._create_only())
        if if_match is not None:
            headers["If-Match"] = if_match
        key = self.key(name)
        response = await self._request("PUT", key, headers=headers, body=_Bytes(body),
                                       payload=hashlib.sha256(body).hexdigest())
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
        return etag if await self._written(response, f"PUT {key}") else None

    async def _written(self, response, what: str) -> bool:
        if response.code in (412, 409):
            self._discard(response)
            return False
        if response.code not in (200, 201, 204):
            raise await self._failed(response, what)
        body = await self._small(response, what)
        if b"<Error>" in body:
            # CompleteMultipartUpload can fail after its 200.
            code = _error_code(body)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StorageError(f"the object store failed {what}: {code}")
        return True

    async def upload(self, name: str, path: str, size: int, sha256: str, content_type: str,
                     metadata: Optional[Dict[str, str]] = None) -> bool:
        """
        Stream the file at ``path`` (``size`` bytes whose sha256 is
        ``sha256``, already verified) into ``name``, create-only: False if
        another replica put it there first.  Large files go up in parts.
        """
        key = self.key(name)
        headers = {"Content-Type": content_type, **_meta(metadata)}
        if size <= self.part_size:
            response = await self._request("PUT", key, headers={**headers, **self._create_only()},
                                           body=_FileRegion(path, 0, size, self._run), payload=sha256)
            return await self._written(response, f"PUT {key}")
        return await self._multipart(key, path, size, headers)

    async def _multipart(self, key: str, path: str, size: int, headers: Dict[str, str]) -> bool:
        response = await self._request("POST", key, "uploads=", headers=headers)
        if response.code != 200:
            raise await self._failed(response, f"the multipart upload of {key}")
        upload = _text(await self._small(response, f"the multipart upload of {key}"), "UploadId")
        if not upload:
            raise StorageError(f"the object store named no upload id for {key}")
        try:
            etags = []
            for number, offset in enumerate(range(0, size, self.part_size), 1):
                length = min(self.part_size, size - offset)
                # The part's own hash is not known without reading it twice.
                response = await self._request(
                    "PUT", key, f"partNumber={number}&uploadId={quote(upload, safe='')}",
                    body=_FileRegion(path, offset, length, self._run), payload="UNSIGNED-PAYLOAD")
                if response.code != 200:
                    raise await self._failed(response, f"part {number} of {key}")
                self._discard(response)
                etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
                etags.append((number, etag))
            xml = "<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in etags
            ) + "</CompleteMultipartUpload>"
            body = xml.encode()
            response = await self._request("POST", key, f"uploadId={quote(upload, safe='')}",
                                           headers=self._create_only(), body=_Bytes(body),
                                           payload=hashlib.sha256(body).hexdigest())
            done = await self._written(response, f"the multipart upload of {key}")
        except BaseException:
            await self._abort(key, upload)
            raise
        if not done:
            await self._abort(key, upload)
        return done

    async def _abort(self, key: str, upload: str) -> None:
        try:
            response = await self._request("DELETE", key, f"uploadId={quote(upload, safe='')}")
            self._discard(response)
        except StorageError as e:
            self.log.warn("Could not abort the upload of {key}: {error}", key=key, error=str(e))

    async def delete(self, name: str, if_match: Optional[str] = None) -> bool:
        """Remove ``name``; False if it changed since ``if_match`` (its ETag then)."""
        key = self.key(name)
        headers = {"If-Match": if_match} if if_match else {}
        response = await self._request("DELETE", key, headers=headers)
        self._discard(response)
        if response.code == 412:
            return False
        if response.code not in (200, 204, 404):
            raise StorageError(f"the object store answered {response.code} to DELETE {key}", response.code)
        return True

    async def list(self, prefix: str, after: Optional[str] = None, limit: int = 1000) -> Tuple[List[Listed], Optional[str]]:
        """
        A page of the objects under ``prefix`` (names without the bucket's
        own prefix), and the token of the next page, if any.
        """
        query = f"list-type=2&max-keys={limit}&prefix={quote(self.key(prefix), safe='')}"
        if after:
            query += f"&continuation-token={quote(after, safe='')}"
        response = await self._request("GET", "", query)
        if response.code != 200:
            raise await self._failed(response, f"the listing of {prefix}")
        root = _parse(await self._small(response, f"the listing of {prefix}"))
        cut = len(self.settings.prefix)
        found = [
            Listed(c.findtext(f"{_NS}Key", "")[cut:], int(c.findtext(f"{_NS}Size", "0")),
                   c.findtext(f"{_NS}LastModified", ""))
            for c in root.iter(f"{_NS}Contents")
        ]
        truncated = root.findtext(f"{_NS}IsTruncated", "false") == "true"
        return found, (root.findtext(f"{_NS}NextContinuationToken") if truncated else None)

    async def create_bucket(self) -> None:
        """Make the bucket if it is not there (SeaweedFS, tests); a cloud bucket is the operator's."""
        response = await self._request("HEAD", "")
        self._discard(response)
        if response.code == 200:
            return
        response = await self._request("PUT", "")
        if response.code not in (200, 409):
            raise await self._failed(response, f"creating the bucket {self.settings.bucket}")
        self._discard(response)


#: The most of an unwanted body read to its end so its connection can be
#: used again; a larger one (or one of unknown length) gives it up.
MAX_DISCARD = 64 * 1024


class _Discard:
    """
    A body nobody wants: read and dropped, so the connection goes back to
    the pool, if it is small and ends within ``timeout``; else the
    connection is given up, so a store that drips or sends a huge body
    cannot hold a socket for ever.
    """

    def __init__(self, reactor=None, timeout: float = 10.0, give_up: bool = False, length=UNKNOWN_LENGTH):
        self._reactor = reactor
        self._timeout = timeout
        self._give_up = give_up or length is UNKNOWN_LENGTH or length > MAX_DISCARD
        self._transport = None
        self._timer = None
        self._read = 0

    def makeConnection(self, transport):
        self._transport = transport
        if self._give_up:
            transport.stopProducing()
        elif self._reactor is not None:
            self._timer = self._reactor.callLater(self._timeout, self._stop)

    def _stop(self):
        self._timer = None
        if self._transport is not None:
            self._transport.stopProducing()

    def dataReceived(self, data):
        self._read += len(data)
        if self._read > MAX_DISCARD and self._transport is not None:
            self._transport.stopProducing()

    def connectionLost(self, reason):
        self._transport = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _info(response) -> ObjectInfo:
    headers = response.headers
    if response.length is not UNKNOWN_LENGTH and response.request.method != b"HEAD":
        size = response.length
    else:
        # A HEAD's length is the object's, left in its headers: its body is empty.
        length = headers.getRawHeaders(b"content-length", [b""])[0]
        size = int(length) if length.isdigit() else -1
    etag = headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
    metadata = {}
    for name, values in headers.getAllRawHeaders():
        lower = name.decode("latin-1").lower()
        if lower.startswith(META):
            metadata[lower[len(META):]] = values[0].decode("latin-1")
    return ObjectInfo(size, etag, metadata)


def _range(response) -> Tuple[Optional[int], Optional[int]]:
    """(the first byte, the whole object's size) a 206's Content-Range names, each None if unreadable."""
    value = response.headers.getRawHeaders(b"content-range", [b""])[0].decode("latin-1")
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    first = span.partition("-")[0]
    return (int(first) if unit == "bytes" and first.isdigit() else None,
            int(total) if total.isdigit() else None)


def _meta(metadata: Optional[Dict[str, str]]) -> Dict[str, str]:
    return {META + k: v for k, v in (metadata or {}).items()}


def _parse(body: bytes):
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise StorageError(f"the object store sent XML that does not parse: {e}")


def _text(body: bytes, tag: str) -> Optional[str]:
    root = _parse(body)
    return root.findtext(f"{_NS}{tag}") or root.findtext(tag)


def _error_code(body: bytes) -> str:
    """S3's error code (NoSuchKey, PreconditionFailed...) from an error body, or what the body began with."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return body[:200].decode("utf-8", "replace") or "no body"
    return root.findtext("Code") or root.findtext(f"{_NS}Code") or "no code"
