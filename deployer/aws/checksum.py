"""The SHA256 checksum S3 keeps for an artifact `deployer.aws.s3.Upload` sends, computed locally.

Apart from `deployer.aws.s3` so that hashing loads no AWS SDK: `deployer publish` starts hashing
its artifact before it imports boto3 (`publisher.artifact_file`).
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Multipart part size and parts in flight for artifact uploads: `aws s3 cp`'s 8 MiB parts, 6 at
#: a time. Memory stays bounded whatever the artifact's size (s3transfer reads each part from the
#: file as it sends it): publishing 1 GiB peaks at 88 MB here, 94 MB with 8 parts in flight
#: (docs/benchmarks.md, figure 5; the target is < 100 MB).
UPLOAD_PART_BYTES = 8 * 1024 * 1024
UPLOAD_CONCURRENCY = 6


class ObjectChecksum:
    """The SHA256 checksum S3 computes and stores for an object `Upload` sends (`ChecksumSHA256`).

    S3 checks it against the bytes it received and keeps it with the object, so a later
    HeadObject says what S3 holds, not what a writer claimed: an object overwritten since, or
    cut, no longer matches. For a single PUT it is the object's own sha256; for a multipart upload
    the sha256 of the parts' sha256 digests, then `-<parts>` (a COMPOSITE checksum), so the part
    size here must be `Upload`'s. Fed by the same pass that hashes the artifact anyway.
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html
    """

    def __init__(self, *, whole: bool = True, parts: bool = True) -> None:
        self.whole = hashlib.sha256()
        self.size = 0
        self._parts: list[bytes] = []
        self._part = hashlib.sha256()
        self._in_part = 0
        self._hash_whole, self._hash_parts = whole, parts

    @classmethod
    def of_file(cls, path: Path, chunk: int) -> ObjectChecksum:
        """A file's checksum in two passes side by side, the object's sha256 here and the parts'
        in a thread: each is a full SHA-256 of the file, hashlib releases the GIL for both, so on
        two cores a re-publish hashes in the time of one (the page cache serves the second read)."""
        parts = cls(whole=False)
        checksum = cls(parts=False)

        def feed(into: ObjectChecksum) -> None:
            with open(path, "rb") as handle:
                while data := handle.read(chunk):
                    into.update(data)

        with ThreadPoolExecutor(1, thread_name_prefix="part-checksums") as pool:
            other = pool.submit(feed, parts)
            feed(checksum)
            other.result()
        checksum._parts, checksum._part, checksum._in_part = parts._parts, parts._part, parts._in_part
        return checksum

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._hash_whole:
            self.whole.update(view)
        self.size += view.nbytes
        if not self._hash_parts:
            return
        while view.nbytes:
            taken = view[: UPLOAD_PART_BYTES - self._in_part]
            self._part.update(taken)
            self._in_part += taken.nbytes
            view = view[taken.nbytes :]
            if self._in_part == UPLOAD_PART_BYTES:
                self._parts.append(self._part.digest())
                self._part, self._in_part = hashlib.sha256(), 0

    @property
    def value(self) -> str:
        """`ChecksumSHA256` as HeadObject answers it for this upload."""
        if self.size < UPLOAD_PART_BYTES:  # s3transfer sends one PutObject below its threshold
            return base64.b64encode(self.whole.digest()).decode()
        parts = self._parts + ([self._part.digest()] if self._in_part else [])
        return f"{base64.b64encode(hashlib.sha256(b''.join(parts)).digest()).decode()}-{len(parts)}"
