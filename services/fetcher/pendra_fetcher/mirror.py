"""The S3/MinIO mirror: GGUF blobs stored by their SHA-256, so a cluster installs once from the
internet and every later install (or an air-gapped cluster) from the mirror.

`PENDRA_MIRROR_URL` is `http(s)://host:port/bucket[/prefix]`; blobs live at `<prefix>/sha256/<hex>`,
a key built only from a checked digest (64 lowercase hex digits), so no entry can aim it elsewhere.
The mirror is also the `Source` for catalogue entries whose `gguf_url` is `s3://bucket/key`. The
operator configured it, so the address check of http(s) sources does not apply to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import S3Error
from pendra_shared.catalogue import is_sha256
from pendra_shared.errors import ConfigError, InstallError, TransientDownloadError
from pendra_shared.fsutil import CHUNK
from pendra_shared.sources import Guard, Stream

logger = logging.getLogger(__name__)

_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject"})


class S3Mirror:
    def __init__(self, url: str, access_key: str, secret_key: str, timeout_s: float = 30.0) -> None:
        parsed = urlparse(url)
        parts = [p for p in parsed.path.split("/") if p]
        if parsed.scheme not in ("http", "https") or not parsed.netloc or not parts:
            raise ConfigError(f"PENDRA_MIRROR_URL {url!r} must look like http(s)://host:port/bucket[/prefix]")
        self.bucket = parts[0]
        self.prefix = "".join(f"{p}/" for p in parts[1:])
        self.endpoint = parsed.netloc
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self.client = Minio(
            parsed.netloc,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=parsed.scheme == "https",
            http_client=http,
        )

    def __str__(self) -> str:
        return f"s3 mirror {self.endpoint}/{self.bucket}/{self.prefix}"

    def key_for(self, sha256: str) -> str:
        if not is_sha256(sha256):
            raise ValueError("a mirror key needs a SHA-256 of 64 lowercase hex digits")
        return f"{self.prefix}sha256/{sha256}"

    def url_for(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key_for(sha256)}"

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)
            logger.info("created bucket %s on %s", self.bucket, self.endpoint)

    def size_of(self, bucket: str, key: str) -> int | None:
        """The object's size, or None when it is not there."""
        try:
            return self.client.stat_object(bucket, key).size
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise

    def has(self, sha256: str) -> bool:
        return self.size_of(self.bucket, self.key_for(sha256)) is not None

    def remove(self, sha256: str) -> None:
        self.client.remove_object(self.bucket, self.key_for(sha256))
        logger.warning("removed %s from the mirror", self.url_for(sha256))

    def upload(self, path: Path, sha256: str) -> None:
        self.client.fput_object(
            self.bucket,
            self.key_for(sha256),
            str(path),
            content_type="application/octet-stream",
            metadata={"sha256": sha256},
        )
        logger.info("mirrored %s to %s", path.name, self.url_for(sha256))

    # -- Source for s3:// URLs ------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, url: str, offset: int, guard: Guard) -> Iterator[Stream]:
        parsed = urlparse(url)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        try:
            total = self.size_of(bucket, key)
            if total is None:
                raise InstallError(f"{url}: not in the mirror at {self.endpoint}")
            start = offset if offset < total else 0
            response = self.client.get_object(bucket, key, offset=start) if start < total else None
        except S3Error as exc:
            raise InstallError(f"{url}: the mirror answered {exc.code}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientDownloadError(f"mirror {self.endpoint}: {exc}") from exc
        if response is None:
            yield Stream(start=0, total=total, chunks=iter(()))
            return
        try:
            yield Stream(start=start, total=total, chunks=self._chunks(response))
        finally:
            response.close()
            response.release_conn()

    @staticmethod
    def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from response.stream(CHUNK)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientDownloadError(f"mirror read failed: {exc}") from exc
