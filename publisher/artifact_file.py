"""A tarball CI built, hashed and checked from the moment `deployer publish` names it.

This module loads no AWS SDK (import-linter holds it to that): the command starts hashing before
it imports boto3 and makes its clients, which together take about as long as hashing a 100 MiB
artifact. On a runner with a core to spare the two overlap; on 2 cores, where the hash's two
SHA-256 passes already take both and the GIL serialises the rest, a re-publish gains about 4 %
(docs/benchmarks.md, figure 5's note).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import structlog

from publisher.cache import PublishCache
from publisher.pack import Artifact, Compression, check_artifact, file_artifact, sniff

log = structlog.get_logger(__name__)


class ArtifactFile:
    """A tarball CI built, hashed (and checked, unless the cache saw these bytes pass) in threads
    of its own from the moment it is named; `Publisher.publish` takes it where it takes a path.

    Whether the check starts at once or after the hash is decided as `publish` always did: the
    check of a file the cache has not seen checked (by its path and stat fields: a hint, never the
    verdict) starts beside the hashing; one the cache has seen is checked only if its sha256 turns
    out not to be the one that passed. Use as a context manager: leaving it waits for both threads.
    """

    def __init__(self, path: Path, cache: PublishCache | None) -> None:
        self.path = path
        compression = sniff(path)  # not a tarball: the error before any thread or request
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="artifact")
        if cache is not None and cache.seen_checked(path):
            self._hashed = self._pool.submit(lambda: known(file_artifact(path, compression), cache))
            self.checking = self._pool.submit(lambda: check(self._hashed.result(), cache))
        else:
            self._hashed = self._pool.submit(file_artifact, path, compression)
            self.checking = self._pool.submit(self._check_now, compression, cache)

    def _check_now(self, compression: Compression, cache: PublishCache | None) -> None:
        check_artifact(self.path, compression)
        if cache is not None:
            cache.remember_checked(self._hashed.result().sha256, self.path)

    def result(self) -> Artifact:
        """The hashed artifact (waits for the hash; its error, if reading the file failed)."""
        return self._hashed.result()

    def __enter__(self) -> ArtifactFile:
        return self

    def __exit__(self, *_: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def known(artifact: Artifact, cache: PublishCache | None) -> Artifact:
    """`artifact`, marked checked if the cache saw these very bytes (by sha256) pass the check."""
    if artifact.checked or cache is None or not cache.checked(artifact.sha256):
        return artifact
    log.info("artifact_check_cached", sha256=artifact.sha256, next="not checking these bytes again")
    return replace(artifact, checked=True)


def check(artifact: Artifact, cache: PublishCache | None) -> None:
    """`check_artifact`, unless it is known to pass; a pass is remembered in the cache."""
    if artifact.checked:
        return
    check_artifact(artifact.path, artifact.compression)
    if cache is not None:
        cache.remember_checked(artifact.sha256, artifact.path)
