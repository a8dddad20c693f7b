"""The release manifest: stretcher's YAML format, read as is, plus a few compatible extensions.

stretcher keys: src, checksum, dest, dest_mode, commands.{pre,post,success,failure}, excludes,
exclude_from, sync_strategy (rsync | mv). Extensions: sync_strategy `symlink`, keep_releases,
env, hook_timeout, health, run_as, traffic, and hooks written as {run, timeout, env} mappings
instead of plain strings.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

from deployer.protocol.decoding import yaml_mapping
from deployer.protocol.errors import ManifestError
from deployer.protocol.limits import MAX_MANIFEST_BYTES

#: Hex digest length → hashlib algorithm, as stretcher picks it.
CHECKSUM_ALGORITHMS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
SRC_SCHEMES = ("s3", "https", "http", "file")
HOOK_PHASES = ("pre", "post", "success", "failure")
DEFAULT_KEEP_RELEASES = 5
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_TOP_KEYS = {
    "src",
    "checksum",
    "dest",
    "dest_mode",
    "commands",
    "excludes",
    "exclude_from",
    "sync_strategy",
    "keep_releases",
    "env",
    "hook_timeout",
    "health",
    "run_as",
    "traffic",
}
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class SyncStrategy(enum.StrEnum):
    RSYNC = "rsync"  # stretcher's default: rsync -a --delete into dest
    MV = "mv"  # stretcher: move the extracted tree to dest
    SYMLINK = "symlink"  # ours: releases/<id> next to dest, dest is an atomically swapped symlink


class Traffic(enum.StrEnum):
    """Whether applying the release takes the instance out of its load balancer's target groups."""

    MANAGED = "managed"  # the default: deregister, drain, apply, register, wait until healthy
    NONE = "none"  # a component that serves no traffic (a config file, a sidecar): applied in place


class SecretSource(enum.StrEnum):
    SSM = "ssm"  # SSM Parameter Store (a SecureString, decrypted)
    SECRETS_MANAGER = "secretsmanager"


#: SSM parameter names: letters, digits and `_.-/`, up to 2048 characters (a hierarchy starts with `/`).
#: https://docs.aws.amazon.com/systems-manager/latest/userguide/sysman-parameter-name-constraints.html
_SSM_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,2048}$")
#: A Secrets Manager secret's name or ARN. https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_GetSecretValue.html
_SECRET_ID = re.compile(r"^[A-Za-z0-9/_+=.@:\-]{1,2048}$")
_SECRET_KEYS = {"ssm", "secretsmanager", "key", "file"}


@dataclass(frozen=True)
class SecretRef:
    """A secret a hook's environment gets at apply time: named here, its value resolved by the
    agent with its instance role and never written anywhere but the hooks' environment (or a
    file of mode 0400 under the release, with `file`). `key` picks a field of a JSON secret."""

    source: SecretSource
    name: str
    key: str | None = None
    file: str | None = None

    def to_yaml(self) -> dict[str, str]:
        doc = {self.source.value: self.name}
        if self.key is not None:
            doc["key"] = self.key
        if self.file is not None:
            doc["file"] = self.file
        return doc


@dataclass(frozen=True)
class Hook:
    """One `sh -c` command; timeout None means the agent's default."""

    run: str
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Commands:
    pre: tuple[Hook, ...] = ()
    post: tuple[Hook, ...] = ()
    success: tuple[Hook, ...] = ()
    failure: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class HealthCheck:
    """After activation: `command` (exit 0 = healthy) or `http` (2xx = healthy), tried `retries` times."""

    command: str | None = None
    http: str | None = None
    retries: int = 3
    interval: float = 2.0
    timeout: float = 5.0


@dataclass(frozen=True)
class Manifest:
    src: str | None = None
    checksum: str | None = None
    dest: str | None = None
    dest_mode: int | None = None
    commands: Commands = Commands()
    excludes: tuple[str, ...] = ()
    exclude_from: str | None = None
    sync_strategy: SyncStrategy = SyncStrategy.RSYNC
    keep_releases: int = DEFAULT_KEEP_RELEASES
    env: Mapping[str, str] = field(default_factory=dict)
    hook_timeout: float | None = None
    health: HealthCheck | None = None
    run_as: str | None = None
    traffic: Traffic = Traffic.MANAGED
    #: Variables of `env` whose value is a secret to resolve at apply time.
    secrets: Mapping[str, SecretRef] = field(default_factory=dict)

    @property
    def checksum_algorithm(self) -> str | None:
        return CHECKSUM_ALGORITHMS[len(self.checksum)] if self.checksum else None

    def new_hasher(self) -> Any:
        algorithm = self.checksum_algorithm
        return hashlib.new(algorithm) if algorithm else None

    def to_yaml(self) -> str:
        """The manifest as `deployer publish` uploads it; `parse_manifest` reads it back to an equal value."""
        commands = {
            phase: [_hook_to_yaml(h) for h in getattr(self.commands, phase)]
            for phase in HOOK_PHASES
            if getattr(self.commands, phase)
        }
        entries: list[tuple[str, Any, bool]] = [
            ("src", self.src, self.src is not None),
            ("checksum", self.checksum, self.checksum is not None),
            ("dest", self.dest, self.dest is not None),
            ("dest_mode", f"{self.dest_mode or 0:04o}", self.dest_mode is not None),
            ("commands", commands, bool(commands)),
            ("excludes", list(self.excludes), bool(self.excludes)),
            ("exclude_from", self.exclude_from, bool(self.exclude_from)),
            ("sync_strategy", self.sync_strategy.value, True),
            ("keep_releases", self.keep_releases, self.keep_releases != DEFAULT_KEEP_RELEASES),
            (
                "env",
                {**self.env, **{k: ref.to_yaml() for k, ref in self.secrets.items()}},
                bool(self.env or self.secrets),
            ),
            ("hook_timeout", self.hook_timeout, self.hook_timeout is not None),
            (
                "health",
                self.health and {k: v for k, v in asdict(self.health).items() if v is not None},
                bool(self.health),
            ),
            ("run_as", self.run_as, self.run_as is not None),
            ("traffic", self.traffic.value, self.traffic is not Traffic.MANAGED),
        ]
        return yaml.safe_dump({key: value for key, value, present in entries if present}, sort_keys=False)


def parse_manifest(text: str | bytes) -> Manifest:
    """Parse and validate manifest YAML; raise ManifestError naming the offending key."""
    return manifest_from_dict(yaml_mapping(text, what="manifest", error=ManifestError, limit=MAX_MANIFEST_BYTES))


def manifest_from_dict(doc: Mapping[str, Any]) -> Manifest:
    unknown = sorted(str(k) for k in set(doc) - _TOP_KEYS)
    if unknown:
        raise ManifestError(f"manifest has unknown key(s): {', '.join(unknown)}")
    src = _src(doc)
    checksum = _checksum(doc)
    dest = _optional_str(doc, "dest")
    if src is not None:
        if checksum is None:
            raise ManifestError("checksum is required when src is set: an unverified download is never applied")
        if dest is None:
            raise ManifestError("dest is required when src is set")
    if dest is not None and not dest.startswith("/"):
        raise ManifestError(f"dest {dest!r} must be an absolute path")
    if dest is not None and ".." in dest.split("/"):
        # Every dest is placed under the agent's root_dir; `..` would climb out of it.
        raise ManifestError(f"dest {dest!r} must not contain '..': it would leave the root it is placed under")
    sync_strategy = _strategy(doc.get("sync_strategy", SyncStrategy.RSYNC.value))
    if doc.get("env") is not None and not isinstance(doc.get("env"), dict):
        raise ManifestError(f"env must be a mapping of NAME: value, got {doc.get('env')!r}")
    return Manifest(
        src=src,
        checksum=checksum,
        dest=dest,
        dest_mode=_dest_mode(doc.get("dest_mode")),
        commands=_commands(doc.get("commands")),
        excludes=tuple(_str_list(doc, "excludes")),
        exclude_from=_optional_str(doc, "exclude_from"),
        sync_strategy=sync_strategy,
        keep_releases=_keep(doc.get("keep_releases", DEFAULT_KEEP_RELEASES)),
        env=_env({k: v for k, v in (doc.get("env") or {}).items() if not isinstance(v, dict)}, "env"),
        secrets=_secrets(doc.get("env"), sync_strategy),
        hook_timeout=_timeout(doc.get("hook_timeout"), "hook_timeout"),
        health=_health(doc.get("health")),
        run_as=_run_as(doc.get("run_as")),
        traffic=_traffic(doc.get("traffic", Traffic.MANAGED.value)),
    )


def _src(doc: Mapping[str, Any]) -> str | None:
    src = _optional_str(doc, "src")
    if src is not None:
        scheme = urlparse(src).scheme
        if scheme not in SRC_SCHEMES:
            raise ManifestError(f"src {src!r}: scheme {scheme!r} is not one of {', '.join(SRC_SCHEMES)}")
    return src


def _checksum(doc: Mapping[str, Any]) -> str | None:
    if isinstance(doc.get("checksum"), int | float):
        raise ManifestError("checksum was read as a number (all digits?); quote it in the YAML so no digit is lost")
    checksum = _optional_str(doc, "checksum")
    if checksum is None:
        return None
    if not _HEX.match(checksum) or len(checksum) not in CHECKSUM_ALGORITHMS:
        raise ManifestError(
            f"checksum {checksum!r} is not a hex md5/sha1/sha256/sha512 digest (32/40/64/128 hex characters)"
        )
    return checksum.lower()


def _strategy(value: Any) -> SyncStrategy:
    try:
        return SyncStrategy(value)
    except ValueError:
        choices = ", ".join(s.value for s in SyncStrategy)
        raise ManifestError(f"sync_strategy {value!r} is not one of {choices}") from None


def _secrets(env: Any, strategy: SyncStrategy) -> dict[str, SecretRef]:
    """The `env` entries that name a secret ({ssm: NAME} or {secretsmanager: ID, key: FIELD}, with
    an optional `file`), checked; the rest of `env` is plain values."""
    if not isinstance(env, dict):
        return {}
    return {name: _secret(name, value, strategy) for name, value in env.items() if isinstance(value, dict)}


def _secret(name: Any, value: dict[Any, Any], strategy: SyncStrategy) -> SecretRef:
    where = f"env.{name}"
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ManifestError(f"env has an invalid variable name {name!r}")
    unknown = sorted(str(k) for k in set(value) - _SECRET_KEYS)
    sources = [s for s in SecretSource if s.value in value]
    if unknown or len(sources) != 1:
        raise ManifestError(
            f"{where} must be {{ssm: NAME}} or {{secretsmanager: ID, key: FIELD}} (and file), got {sorted(map(str, value))}"
        )
    source = sources[0]
    secret = value[source.value]
    pattern = _SSM_NAME if source is SecretSource.SSM else _SECRET_ID
    if not isinstance(secret, str) or not pattern.match(secret):
        raise ManifestError(f"{where}.{source.value} {secret!r} is not a valid {source.value} name")
    key, path = value.get("key"), value.get("file")
    if key is not None and (not isinstance(key, str) or not key or source is SecretSource.SSM):
        raise ManifestError(f"{where}.key must be a field name of a secretsmanager JSON secret")
    if path is not None:
        if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/") or not path.strip("/"):
            raise ManifestError(f"{where}.file {path!r} must be a relative path inside the release")
        if strategy is not SyncStrategy.SYMLINK:
            raise ManifestError(f"{where}.file needs sync_strategy symlink (the file is written under the release)")
    return SecretRef(source, secret, key, path)


def _traffic(value: Any) -> Traffic:
    try:
        return Traffic(value)
    except ValueError:
        raise ManifestError(f"traffic {value!r} is not one of {', '.join(t.value for t in Traffic)}") from None


def _keep(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ManifestError(f"keep_releases must be an integer >= 2 (active + previous), got {value!r}")
    return value


def _health(value: Any) -> HealthCheck | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"health must be a mapping with command or http, got {value!r}")
    unknown = sorted(str(k) for k in set(value) - {"command", "http", "retries", "interval", "timeout"})
    if unknown:
        raise ManifestError(f"health has unknown key(s): {', '.join(unknown)}")
    command, http = value.get("command"), value.get("http")
    if (command is None) == (http is None):
        raise ManifestError("health needs exactly one of command or http")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise ManifestError(f"health.command must be a command string, got {command!r}")
    if http is not None and (not isinstance(http, str) or urlparse(http).scheme not in ("http", "https")):
        raise ManifestError(f"health.http must be an http(s) URL, got {http!r}")
    retries = value.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 1 <= retries <= 100:
        raise ManifestError(f"health.retries must be an integer 1..100, got {retries!r}")
    return HealthCheck(
        command=command,
        http=http,
        retries=retries,
        interval=_timeout(value.get("interval", 2.0), "health.interval") or 2.0,
        timeout=_timeout(value.get("timeout", 5.0), "health.timeout") or 5.0,
    )


def _run_as(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _USER.match(value):
        raise ManifestError(f"run_as must be a user name, got {value!r}")
    return value


def _optional_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _str_list(doc: Mapping[str, Any], key: str) -> list[str]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{key} must be a list of strings, got {value!r}")
    return value


def _dest_mode(value: Any) -> int | None:
    if value is None:
        return None
    # YAML 1.1 reads an unquoted 0755 as octal already; a quoted "0755" arrives as a string.
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ManifestError(f"dest_mode {value!r} is not an octal file mode") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o7777:
        raise ManifestError(f"dest_mode {value!r} is not a file mode between 0000 and 7777")
    return value


def _commands(value: Any) -> Commands:
    if value is None:
        return Commands()
    if not isinstance(value, dict):
        raise ManifestError(f"commands must be a mapping of {'/'.join(HOOK_PHASES)}, got {value!r}")
    unknown = sorted(str(k) for k in set(value) - set(HOOK_PHASES))
    if unknown:
        raise ManifestError(f"commands has unknown phase(s): {', '.join(unknown)}")
    phases: dict[str, tuple[Hook, ...]] = {}
    for phase in HOOK_PHASES:
        entries = value.get(phase) or []
        if not isinstance(entries, list):
            raise ManifestError(f"commands.{phase} must be a list, got {entries!r}")
        phases[phase] = tuple(_hook(entry, f"commands.{phase}[{i}]") for i, entry in enumerate(entries))
    return Commands(**phases)


def _hook(entry: Any, where: str) -> Hook:
    if isinstance(entry, str) and entry.strip():
        return Hook(run=entry)
    if isinstance(entry, dict):
        unknown = sorted(str(k) for k in set(entry) - {"run", "timeout", "env"})
        if unknown:
            raise ManifestError(f"{where} has unknown key(s): {', '.join(unknown)}")
        run = entry.get("run")
        if not isinstance(run, str) or not run.strip():
            raise ManifestError(f"{where}.run must be a non-empty command string")
        return Hook(
            run=run,
            timeout=_timeout(entry.get("timeout"), f"{where}.timeout"),
            env=_env(entry.get("env"), f"{where}.env"),
        )
    raise ManifestError(f"{where} must be a command string or a {{run, timeout, env}} mapping, got {entry!r}")


def _timeout(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ManifestError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)


def _env(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{where} must be a mapping of NAME: value, got {value!r}")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ManifestError(f"{where} has an invalid variable name {key!r}")
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise ManifestError(f"{where}.{key} must be a string or number, got {item!r}")
        env[key] = str(item)
    return env


def _hook_to_yaml(hook: Hook) -> str | dict[str, Any]:
    if hook.timeout is None and not hook.env:
        return hook.run
    out: dict[str, Any] = {"run": hook.run}
    if hook.timeout is not None:
        out["timeout"] = hook.timeout
    if hook.env:
        out["env"] = dict(hook.env)
    return out
