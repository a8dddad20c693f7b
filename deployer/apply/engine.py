"""The apply engine: put one release on this machine without ever leaving it broken.

fetch + verify + extract (one streaming pass, into a hidden staging directory) → [leave the
load balancer] → pre hooks → activate (symlink swap, or stretcher's rsync / mv) → post hooks →
health check → [rejoin the load balancer] → success hooks → prune.
Like stretcher, the pre hooks run only once the release's bytes are here and verified: a
network failure, however late, has run no hook.
A failure before activation changes nothing; a post-hook failure re-activates the previous
release (symlink strategy) and runs the failure hooks, which get the deploy log on stdin.
"""

from __future__ import annotations

import enum
import json
import os
import pwd
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from deployer.apply.confirmation import Confirmation, confirmed
from deployer.apply.extract import DEFAULT_LIMITS, ExtractLimits, ExtractStats, extract_verified
from deployer.apply.fetch import open_source
from deployer.apply.fsutil import fsync_dir, swap_symlink, sync_filesystem, write_atomic
from deployer.apply.health import run_health_check
from deployer.apply.hooks import DEFAULT_HOOK_TIMEOUT_SECONDS, run_hooks, tail_of
from deployer.apply.prune import releases_to_prune
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import (
    ActivationFailed,
    DeployerError,
    HookFailed,
    Interrupted,
    SecretUnavailable,
    TrafficUnavailable,
)
from deployer.protocol.manifest import Manifest, SyncStrategy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from deployer.aws.secrets import SecretReader

log = structlog.get_logger(__name__)

STAGING_PREFIX = ".incoming-"
RELEASES_DIR = "releases"
#: `releases/.meta/<id>.json` records which artifact (by checksum) a release directory holds, so
#: a directory already on disk (an earlier deploy, or baked into the AMI) is reused only if it
#: is the same artifact. Kept beside the tree, not in it, so the application never sees it.
META_DIR = ".meta"


@dataclass(frozen=True)
class ApplyResult:
    release_id: str
    release_dir: Path | None
    previous_dir: Path | None
    reused: bool
    output_tail: str
    #: Artifact bytes downloaded for this apply (0 when the release was already on disk).
    downloaded: int = 0


@dataclass
class DeployLog:
    """What happened during one apply, fed to success/failure hooks on stdin (as stretcher does)."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Cutover(Protocol):
    """What surrounds the moment the running release may be disturbed (the agent's load-balancer
    gate, `deployer.agent.traffic`): `leave` once the new release is staged and confirmed, before
    the first pre hook; `rejoin` once its post hooks and health check passed. A `rejoin` that
    raises a HookFailed rolls the release back like a failed health check."""

    def leave(self) -> None: ...

    def rejoin(self) -> None: ...


class _InPlace:
    """No load balancer to leave: the release is switched while the instance serves."""

    def leave(self) -> None:
        pass

    def rejoin(self) -> None:
        pass


IN_PLACE: Cutover = _InPlace()


class Milestone(enum.StrEnum):
    """How far an apply got, so a restart after a crash neither redoes finished hooks nor skips work."""

    STARTED = "started"
    ACTIVATED = "activated"
    POST_HOOKS_DONE = "post_hooks_done"


class Applier:
    def __init__(
        self,
        *,
        s3: S3Client,
        root_dir: Path = Path("/"),
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT_SECONDS,
        limits: ExtractLimits = DEFAULT_LIMITS,
        policy: RetryPolicy = DEFAULT_POLICY,
        interrupt: threading.Event | None = None,
        secrets: SecretReader | None = None,
    ) -> None:
        self.s3 = s3
        #: Reads the secrets a manifest names (`deployer.aws.secrets`); None where nothing can.
        self.secrets = secrets
        self.root_dir = root_dir
        self.hook_timeout = hook_timeout
        self.limits = limits
        self.policy = policy
        #: Set when the apply is abandoned at shutdown: hooks and health-check waits end with Interrupted.
        self.interrupt = interrupt

    def resolve(self, path: str) -> Path:
        """A manifest path under root_dir (`/` on a real instance, a temp dir in tests and the demo)."""
        return self.root_dir / path.lstrip("/")

    def apply(
        self,
        manifest: Manifest,
        release_id: str,
        env: Mapping[str, str],
        on_milestone: Callable[[Milestone], object] | None = None,
        artifact_size: int | None = None,
        confirm: Confirmation | None = None,
        cutover: Cutover = IN_PLACE,
    ) -> ApplyResult:
        """Apply one release. `on_milestone` is told when the release went live and when its post
        hooks finished, so a caller can record progress durably. `artifact_size` (from a signed
        deploy) is checked against the download, like the manifest's checksum.

        `confirm`, when given, is required before anything of the release takes effect: after the
        artifact is staged and synced in its hidden directory, before it is renamed into place,
        before any hook, the failure hooks included. A refusal leaves the machine as it was. The
        agent confirms the deploy against history this way while the download runs.

        `cutover` is told before the first pre hook and after the health check (see `Cutover`);
        the caller puts the instance back into service if the apply fails in between.

        Raises the error of the tree that says what happens next (docs/design.md, "Errors and
        what happens next"), after the failure hooks ran and the previous release was
        re-activated; an `Interrupted` apply runs no failure hook and decides nothing, nor does
        one whose `cutover.leave` raised `TrafficUnavailable` (nothing of the release ran).
        """
        call = _Apply(self, on_milestone or _nothing, artifact_size, confirm or confirmed(), cutover)
        return call.run(manifest, release_id, env)

    def stage(self, manifest: Manifest, release_id: str) -> tuple[Path, bool]:
        """Only put a symlink release's verified tree and its record in `releases/` (`deployer
        seed`): no hook, no activation; one already there and recorded is kept. Where it is,
        and whether it was there already."""
        assert manifest.dest is not None
        releases = self.resolve(manifest.dest).parent / RELEASES_DIR
        release_dir = releases / release_id
        releases.mkdir(parents=True, exist_ok=True)
        if _verified_on_disk(releases, release_id, manifest):
            return release_dir, True
        _Apply(self, _nothing, None, confirmed(), IN_PLACE)._stage(manifest, releases, release_dir, DeployLog())
        _record_verified(releases, release_id, manifest)
        return release_dir, False


@dataclass
class _Apply:
    """One apply: what it reports progress to, what it waits for before anything takes effect,
    what surrounds the switch, and its log. The `Applier` holds only what lasts (the machine's
    root, S3, timeouts, limits, the retry policy), so no call ever sees another's state."""

    machine: Applier
    on_milestone: Callable[[Milestone], object]
    artifact_size: int | None
    confirmation: Confirmation
    cutover: Cutover
    #: Secret values this apply resolved: every hook's output is scrubbed of them.
    secret_values: list[str] = field(default_factory=list)
    #: Artifact bytes this apply downloaded.
    downloaded: int = 0

    def run(self, manifest: Manifest, release_id: str, env: Mapping[str, str]) -> ApplyResult:
        deploy_log = DeployLog()
        # One dict, filled in as the apply learns its release directories, so failure hooks
        # see the same DEPLOYER_* variables as the hook that failed.
        hook_env = {**env, "DEPLOYER_RELEASE_ID": release_id}
        try:
            return self._apply(manifest, release_id, hook_env, deploy_log)
        except (Interrupted, TrafficUnavailable, SecretUnavailable):
            # Nothing of the release ran (the load balancer could not be left, a secret could not
            # be read): no failure hook either, which could restart the app while it still serves.
            raise
        except DeployerError as exc:
            # Failed before it was confirmed (say, a checksum mismatch): its failure hooks run only
            # once it is; a confirmation that fails instead is the error that counts.
            self.confirmation.require()
            deploy_log.add(f"error: {exc}")
            self._failure_hooks(manifest, hook_env, deploy_log)
            raise

    def _apply(self, manifest: Manifest, release_id: str, env: dict[str, str], deploy_log: DeployLog) -> ApplyResult:
        if manifest.src is None:
            # stretcher allows a src-less manifest: it only runs the commands.
            cwd = self.machine.root_dir
            env.setdefault("DEPLOYER_RELEASE_DIR", "")
            env.setdefault("DEPLOYER_PREVIOUS_RELEASE_DIR", "")
            self.confirmation.require()
            self._open_secrets(manifest, env, None)
            self.cutover.leave()
            output = self._hooks(manifest, "pre", env, cwd, deploy_log)
            output += self._post_and_success(manifest, env, cwd, deploy_log, rollback=None)
            return ApplyResult(release_id, None, None, reused=False, output_tail=tail_of(output))
        if manifest.sync_strategy is SyncStrategy.SYMLINK:
            return self._apply_symlink(manifest, release_id, env, deploy_log)
        return self._apply_in_place(manifest, release_id, env, deploy_log)

    # -- symlink strategy -------------------------------------------------------------------

    def _apply_symlink(
        self, manifest: Manifest, release_id: str, env: dict[str, str], deploy_log: DeployLog
    ) -> ApplyResult:
        assert manifest.dest is not None
        link = self.machine.resolve(manifest.dest)
        releases = link.parent / RELEASES_DIR
        release_dir = releases / release_id
        if link.exists() and not link.is_symlink():
            raise ActivationFailed(
                f"dest {manifest.dest} exists and is not a symlink; sync_strategy symlink will not replace it"
            )
        previous = _link_target(link)
        env.update(DEPLOYER_RELEASE_DIR=str(release_dir), DEPLOYER_PREVIOUS_RELEASE_DIR=str(previous or ""))
        releases.mkdir(parents=True, exist_ok=True)

        reused = _verified_on_disk(releases, release_id, manifest)
        if reused:
            self.confirmation.require()
            deploy_log.add(f"release {release_id} already on disk at {release_dir}; not downloading")
            log.info("release_reused", release_dir=str(release_dir))
        else:
            self._stage(manifest, releases, release_dir, deploy_log)
            _record_verified(releases, release_id, manifest)

        # The release is complete and verified on disk (kept there if a pre hook fails, so a retry
        # does not download it again); only now may the application prepare for it.
        self._open_secrets(manifest, env, release_dir)
        self.cutover.leave()
        output = self._hooks(manifest, "pre", env, link.parent, deploy_log)
        swap_symlink(link, f"{RELEASES_DIR}/{release_id}")
        self.on_milestone(Milestone.ACTIVATED)
        deploy_log.add(f"activated {release_dir}")
        log.info("release_activated", release_dir=str(release_dir), previous_dir=str(previous or ""))

        def rollback() -> None:
            if previous is not None and previous != release_dir:
                swap_symlink(link, f"{RELEASES_DIR}/{previous.name}")
                deploy_log.add(f"rolled back to {previous}")
                log.warning("release_rolled_back", release_dir=str(previous))
            elif previous is None:
                link.unlink(missing_ok=True)
                deploy_log.add("rolled back: no previous release, current removed")

        output += self._post_and_success(manifest, env, release_dir, deploy_log, rollback=rollback)
        self._prune(
            releases, active=release_id, previous=previous.name if previous else None, keep=manifest.keep_releases
        )
        return ApplyResult(
            release_id, release_dir, previous, reused=reused, output_tail=tail_of(output), downloaded=self.downloaded
        )

    # -- stretcher's rsync / mv strategies ----------------------------------------------------

    def _apply_in_place(
        self, manifest: Manifest, release_id: str, env: dict[str, str], deploy_log: DeployLog
    ) -> ApplyResult:
        assert manifest.dest is not None
        dest = self.machine.resolve(manifest.dest)
        env.update(DEPLOYER_RELEASE_DIR=str(dest), DEPLOYER_PREVIOUS_RELEASE_DIR="")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.parent / f"{STAGING_PREFIX}{dest.name}-{release_id}"
        self._stage(manifest, dest.parent, staged, deploy_log)
        try:
            self._open_secrets(manifest, env, None)
            self.cutover.leave()
            output = self._hooks(manifest, "pre", env, dest.parent, deploy_log)
            if manifest.sync_strategy is SyncStrategy.RSYNC:
                self._rsync(manifest, staged, dest)
            else:
                if dest.exists():
                    raise ActivationFailed(
                        f"sync_strategy mv needs dest {manifest.dest} not to exist (as in stretcher)"
                    )
                os.replace(staged, dest)
                fsync_dir(dest.parent)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        deploy_log.add(f"synced {release_id} into {dest} ({manifest.sync_strategy.value})")
        output += self._post_and_success(manifest, env, dest, deploy_log, rollback=None)
        return ApplyResult(
            release_id, dest, None, reused=False, output_tail=tail_of(output), downloaded=self.downloaded
        )

    def _rsync(self, manifest: Manifest, staged: Path, dest: Path) -> None:
        # --checksum: reproducible builds give every file the same mtime, and rsync's default
        # size+mtime quick check would then skip a changed file of unchanged size.
        command = ["rsync", "-a", "--delete", "--checksum"]
        command += [f"--exclude={pattern}" for pattern in manifest.excludes]
        if manifest.exclude_from:
            command.append(f"--exclude-from={manifest.exclude_from}")
        command += [f"{staged}/", f"{dest}/"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ActivationFailed("sync_strategy rsync needs the rsync command, which is not installed") from None
        if result.returncode != 0:
            raise ActivationFailed(f"rsync exited {result.returncode}: {result.stderr.strip()[-500:]}")

    # -- shared steps ---------------------------------------------------------------------------

    def _stage(self, manifest: Manifest, parent: Path, final: Path, deploy_log: DeployLog) -> None:
        """Download, verify and extract into a hidden directory, then rename it to `final`.

        The whole streaming pass is one attempt under the retry policy: a download cut at any
        point (reset, clean close, stall) throws the partial tree away and starts again, so the
        network never gets to decide anything about the release. The staged tree enters `final`
        only once the deploy is confirmed (see `apply`).
        """
        assert manifest.src is not None
        _remove_stale_staging(parent)
        staging, stats = self.machine.policy.call(self._stage_once, manifest, parent, final)
        try:
            self.confirmation.require()
            if final.exists():
                # On disk but not recorded as this artifact (a crash before the record, a hand-made
                # directory, a different artifact under the same id): never trust it, replace it.
                log.warning("release_dir_unverified", release_dir=str(final), next="replacing it with the download")
                _discard(final)
            os.replace(staging, final)
            fsync_dir(parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.downloaded += stats.downloaded
        deploy_log.add(f"fetched {manifest.src}: {stats.downloaded} bytes, {stats.members} members, checksum ok")
        log.info("release_extracted", src=manifest.src, bytes=stats.downloaded, members=stats.members)

    def _stage_once(self, manifest: Manifest, parent: Path, final: Path) -> tuple[Path, ExtractStats]:
        assert manifest.src is not None
        assert manifest.checksum is not None
        staging = parent / f"{STAGING_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            with open_source(manifest.src, self.machine.s3) as stream:
                stats = extract_verified(
                    stream,
                    staging,
                    hasher=manifest.new_hasher(),
                    expected_digest=manifest.checksum,
                    expected_size=self.artifact_size,
                    limits=self.machine.limits,
                    excludes=manifest.excludes if manifest.sync_strategy is SyncStrategy.SYMLINK else (),
                )
            if manifest.dest_mode is not None:
                staging.chmod(manifest.dest_mode)
            # The release must be durable before anything points at it: a power cut after the
            # symlink swap must not find empty files. The extraction already started each file's
            # writeback (`start_writeback`), which only makes this wait shorter: it is this
            # syncfs, data and metadata, that the rename below waits for. A crash before it
            # returns leaves a hidden staging directory that nothing points at (removed on the
            # next apply); a crash after it finds the whole release on disk.
            sync_filesystem(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, stats

    def _open_secrets(self, manifest: Manifest, env: dict[str, str], release_dir: Path | None) -> None:
        """The manifest's secrets into the hooks' environment (or files of mode 0400 under the
        release): once the deploy is confirmed, before the first hook, and never anywhere else."""
        if not manifest.secrets:
            return
        if self.machine.secrets is None:
            raise SecretUnavailable(
                f"the manifest names secrets ({', '.join(manifest.secrets)}) and nothing here reads them"
            )
        values = self.machine.secrets(manifest.secrets)
        self.secret_values.extend(sorted((v for v in values.values() if v), key=len, reverse=True))
        for variable, ref in manifest.secrets.items():
            if ref.file is None:
                env[variable] = values[variable]
                continue
            assert release_dir is not None  # the manifest parser allows files with the symlink strategy only
            path = release_dir / ref.file
            _write_secret(path, values[variable], manifest.run_as)
            env[variable] = str(path)

    def redact(self, text: str) -> str:
        """`text` with every secret value this apply resolved replaced by `***`."""
        for value in self.secret_values:
            text = text.replace(value, "***")
        return text

    def _post_and_success(
        self, manifest: Manifest, env: Mapping[str, str], cwd: Path, deploy_log: DeployLog, rollback: object
    ) -> str:
        try:
            output = self._hooks(manifest, "post", env, cwd, deploy_log)
            if manifest.health is not None:
                output += run_health_check(
                    manifest.health,
                    env={**os.environ, **manifest.env, **env},
                    cwd=cwd,
                    user=manifest.run_as,
                    interrupt=self.machine.interrupt,
                    redact=self.redact,
                )
                deploy_log.add("health check ok")
            self.cutover.rejoin()
        except HookFailed:  # a failed health check is one too; apply() runs the failure hooks
            if callable(rollback):
                rollback()
            raise
        self.on_milestone(Milestone.POST_HOOKS_DONE)
        try:
            output += self._hooks(manifest, "success", env, cwd, deploy_log, stdin_text=deploy_log.text())
        except (HookFailed, Interrupted) as exc:
            # The release is live and healthy by its own post hooks; a failing notifier must not undo it.
            log.warning("success_hook_failed", error=str(exc), next="the release stays active")
        return output

    def _failure_hooks(self, manifest: Manifest, env: Mapping[str, str], deploy_log: DeployLog) -> None:
        try:
            self._hooks(manifest, "failure", env, self.machine.root_dir, deploy_log, stdin_text=deploy_log.text())
        except (HookFailed, Interrupted) as exc:
            log.warning("failure_hook_failed", error=str(exc), next="the apply's own error is reported")

    def _hooks(
        self,
        manifest: Manifest,
        phase: str,
        env: Mapping[str, str],
        cwd: Path,
        deploy_log: DeployLog,
        stdin_text: str | None = None,
    ) -> str:
        hooks = getattr(manifest.commands, phase)
        if not hooks:
            return ""
        output = run_hooks(
            hooks,
            phase=phase,
            env={**manifest.env, **env},
            cwd=cwd if cwd.is_dir() else self.machine.root_dir,
            default_timeout=manifest.hook_timeout or self.machine.hook_timeout,
            stdin_text=stdin_text,
            user=manifest.run_as,
            interrupt=self.machine.interrupt,
            redact=self.redact,
        )
        deploy_log.add(f"{phase} hooks ok")
        if output:
            deploy_log.add(output.rstrip("\n"))
        return output

    def _prune(self, releases: Path, *, active: str, previous: str | None, keep: int) -> None:
        entries = [
            (p.name, p.lstat().st_mtime) for p in releases.iterdir() if p.is_dir() and not p.name.startswith(".")
        ]
        for name in releases_to_prune(entries, active=active, previous=previous, keep=keep):
            (releases / META_DIR / f"{name}.json").unlink(missing_ok=True)
            shutil.rmtree(releases / name, ignore_errors=True)
            log.info("release_pruned", release=name)


def _nothing(_milestone: Milestone) -> None:
    pass


def is_active(root_dir: Path, manifest: Manifest, release_id: str) -> bool:
    """Whether `dest` already points at this release (symlink strategy only; others cannot tell)."""
    if manifest.sync_strategy is not SyncStrategy.SYMLINK or manifest.dest is None:
        return False
    link = root_dir / manifest.dest.lstrip("/")
    target = _link_target(link)
    return target is not None and target == (link.parent / RELEASES_DIR / release_id).resolve()


def _link_target(link: Path) -> Path | None:
    if not link.is_symlink():
        return None
    return (link.parent / os.readlink(link)).resolve()


def _verified_on_disk(releases: Path, release_id: str, manifest: Manifest) -> bool:
    try:
        meta = json.loads((releases / META_DIR / f"{release_id}.json").read_text())
    except (OSError, ValueError):
        return False
    return bool((releases / release_id).is_dir() and meta.get("checksum") == manifest.checksum)


def _record_verified(releases: Path, release_id: str, manifest: Manifest) -> None:
    meta = {"checksum": manifest.checksum, "algorithm": manifest.checksum_algorithm, "src": manifest.src}
    write_atomic(releases / META_DIR / f"{release_id}.json", json.dumps(meta, sort_keys=True).encode())


def _write_secret(path: Path, value: str, owner: str | None) -> None:
    """Mode 0400, written whole (temp file + rename) and owned by the hooks' user when they run as one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value)
    if owner is not None and os.geteuid() == 0:
        account = pwd.getpwnam(owner)
        os.chown(temporary, account.pw_uid, account.pw_gid)
    os.replace(temporary, path)


def _discard(path: Path) -> None:
    # Rename first so a crash mid-delete leaves a staging leftover (cleaned next time), not a half tree.
    doomed = path.parent / f"{STAGING_PREFIX}discard-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_staging(parent: Path) -> None:
    # Leftovers of an apply killed mid-extraction; safe to remove because we hold the apply lock.
    if not parent.is_dir():
        return
    for leftover in parent.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
