"""Agent configuration: parsed once from YAML into a frozen dataclass, checked when built."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deployer.apply.hooks import DEFAULT_HOOK_TIMEOUT_SECONDS
from deployer.apply.lock import DEFAULT_STATE_DIR
from deployer.protocol.decoding import yaml_mapping
from deployer.protocol.errors import ConfigError, InvalidMessage
from deployer.protocol.limits import (
    DEFAULT_DRAIN_TIMEOUT_SECONDS,
    DEFAULT_TRAFFIC_POLL_SECONDS,
    MAX_REDRIVE_RECEIVE_COUNT,
    MAX_VISIBILITY_TIMEOUT_SECONDS,
    MAX_WAIT_TIME_SECONDS,
)
from deployer.protocol.names import (
    AUTO_TARGET_GROUPS,
    BUCKET_PATTERN,
    DEFAULT_PREFIX,
    DEFAULT_QUEUE_PREFIX,
    QUEUE_PREFIX_PATTERN,
    TARGET_GROUP_ARN,
    ZONE_PATTERN,
    Channel,
    TopicArn,
    check_name,
    queue_name,
)
from deployer.protocol.report import DEFAULT_HEARTBEAT_INTERVAL_SECONDS

DEFAULT_METADATA_ENDPOINT = "http://169.254.169.254"
#: Bounded settings: name → (lowest, highest, where the bound comes from).
_RANGES = {
    "poll_wait_seconds": (0, MAX_WAIT_TIME_SECONDS, " (SQS limit)"),
    "visibility_timeout_seconds": (30, MAX_VISIBILITY_TIMEOUT_SECONDS, ""),
    "max_receive_count": (1, MAX_REDRIVE_RECEIVE_COUNT, " (SQS redrive limit)"),
}
_POSITIVE = (
    "reconcile_interval_seconds",
    "heartbeat_interval_seconds",
    "hook_timeout_seconds",
    "shutdown_grace_seconds",
    "traffic_poll_seconds",
    "traffic_drain_timeout_seconds",
    "lifecycle_poll_seconds",
)
#: Auto Scaling name rules: https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_PutLifecycleHook.html
_LIFECYCLE_HOOK = re.compile(r"^[A-Za-z0-9./_-]{1,255}$")
_ASG_NAME = re.compile(r"^[^:\s][^:]{0,254}$")


@dataclass(frozen=True)
class AgentConfig:
    stage: str
    role: str
    components: tuple[str, ...]
    bucket: str
    topic_arn: str
    prefix: str = DEFAULT_PREFIX
    queue_prefix: str = DEFAULT_QUEUE_PREFIX
    region: str | None = None
    endpoint_url: str | None = None
    instance_id: str | None = None
    #: The instance's Availability Zone (zonal waves); looked up in IMDS if unset.
    availability_zone: str | None = None
    metadata_endpoint: str = DEFAULT_METADATA_ENDPOINT
    state_dir: Path = DEFAULT_STATE_DIR
    root_dir: Path = Path("/")
    poll_wait_seconds: int = MAX_WAIT_TIME_SECONDS
    visibility_timeout_seconds: int = 600
    max_receive_count: int = 5
    reconcile_interval_seconds: float = 300.0
    heartbeat_interval_seconds: float = DEFAULT_HEARTBEAT_INTERVAL_SECONDS
    hook_timeout_seconds: float = DEFAULT_HOOK_TIMEOUT_SECONDS
    #: After SIGTERM, how long a running apply may go on before it is abandoned (hooks killed,
    #: exit 0); the on-disk state is then exactly what a kill -9 leaves, which is crash-safe.
    shutdown_grace_seconds: float = 60.0
    #: Auto Scaling launch hook to complete after boot replay (CONTINUE, or ABANDON on failure); off if unset.
    lifecycle_hook_name: str | None = None
    #: The instance's Auto Scaling group; looked up with DescribeAutoScalingInstances if unset.
    lifecycle_asg_name: str | None = None
    #: The load balancer target groups to leave while a release is switched and rejoin after
    #: (deployer.agent.traffic): ARNs, or `auto` for the Auto Scaling group's. Empty: none.
    target_group_arns: tuple[str, ...] | str = ()
    #: The app's port: its established connections are the requests a drain waits for (default:
    #: the port each target is registered on).
    traffic_port: int | None = None
    #: How often ELB is asked for this instance's target health while waiting (ELB API rate).
    traffic_poll_seconds: float = DEFAULT_TRAFFIC_POLL_SECONDS
    #: How long ELB may take to show a deregistered target draining before `traffic_drain_timeout`.
    traffic_drain_timeout_seconds: float = DEFAULT_DRAIN_TIMEOUT_SECONDS
    #: How long a registered release may take to be `healthy` (default: twice HealthyThresholdCount
    #: + 1 intervals of the slowest group) before `register_unhealthy` rolls it back.
    traffic_healthy_timeout_seconds: float | None = None
    #: Auto Scaling terminate hook (EC2_INSTANCE_TERMINATING): when IMDS says the instance is
    #: terminating, leave cleanly and complete it with CONTINUE (deployer.agent.termination). Off if unset.
    terminate_hook_name: str | None = None
    #: How often IMDS is asked for the instance's target lifecycle state (a loopback call).
    lifecycle_poll_seconds: float = 5.0
    #: Protect the instance from scale-in while a deploy runs (deployer.agent.protection).
    scale_in_protection: bool = False
    #: A Prometheus node_exporter textfile the agent rewrites with its metrics (e.g.
    #: /var/lib/node_exporter/textfile/deployer.prom); EMF lines go to the log whatever this says.
    metrics_textfile: Path | None = None
    #: On a clean SIGTERM, unsubscribe and delete this instance's queues and status report.
    deregister_on_shutdown: bool = False
    #: `deployer apply --config` only: accept http:// manifest URLs (nothing protects them in transit).
    allow_http_manifests: bool = False
    #: The trust document baked into the image: the keys that sign deploys (and trust updates).
    #: Signed documents are verified against it whenever it is set.
    trust_file: Path | None = None
    #: Refuse unsigned deploy documents (needs `trust_file`). Off while a fleet migrates: agents
    #: first verify what is signed, then publishers sign, then agents require it.
    require_signatures: bool = False

    def __post_init__(self) -> None:
        self._check_names()
        for name, (low, high, why) in _RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name} {value} must be {low}..{high}{why}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.root_dir.is_absolute() or not self.state_dir.is_absolute():
            raise ConfigError("state_dir and root_dir must be absolute paths")
        self._check_auto_scaling()
        self._check_traffic()
        if self.require_signatures and self.trust_file is None:
            raise ConfigError("require_signatures is set but trust_file is not: nothing to verify signatures with")

    def _check_auto_scaling(self) -> None:
        for name, pattern in (
            ("lifecycle_hook_name", _LIFECYCLE_HOOK),
            ("terminate_hook_name", _LIFECYCLE_HOOK),
            ("lifecycle_asg_name", _ASG_NAME),
            ("availability_zone", ZONE_PATTERN),
        ):
            value = getattr(self, name)
            if value is not None and not pattern.match(value):
                raise ConfigError(f"{name} {value!r} is not a valid Auto Scaling or zone name ({pattern.pattern})")
        if self.lifecycle_asg_name and not (self.lifecycle_hook_name or self.terminate_hook_name):
            raise ConfigError(
                "lifecycle_asg_name is set but neither lifecycle_hook_name nor terminate_hook_name is; "
                "set both or neither"
            )

    def _check_traffic(self) -> None:
        if isinstance(self.target_group_arns, str):
            if self.target_group_arns != AUTO_TARGET_GROUPS:
                raise ConfigError(f"target_group_arns must be a list of target group ARNs or {AUTO_TARGET_GROUPS!r}")
        else:
            for arn in self.target_group_arns:
                if not TARGET_GROUP_ARN.match(arn):
                    raise ConfigError(f"target_group_arns: {arn!r} is not an ELBv2 target group ARN")
        if self.traffic_port is not None and not 1 <= self.traffic_port <= 65535:
            raise ConfigError(f"traffic_port {self.traffic_port} must be 1..65535")
        timeout = self.traffic_healthy_timeout_seconds
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"traffic_healthy_timeout_seconds must be positive, got {timeout}")

    @property
    def behind_load_balancer(self) -> bool:
        return bool(self.target_group_arns)

    def _check_names(self) -> None:
        try:
            for kind, value in (
                ("stage", self.stage),
                ("role", self.role),
                *(("component", c) for c in self.components),
            ):
                check_name(kind, value)
        except InvalidMessage as exc:
            raise ConfigError(str(exc)) from None
        if not self.components:
            raise ConfigError("components must list at least one component (in boot order)")
        if len(set(self.components)) != len(self.components):
            raise ConfigError(f"components lists a component twice: {list(self.components)}")
        if not BUCKET_PATTERN.match(self.bucket):
            raise ConfigError(f"bucket {self.bucket!r} is not a valid S3 bucket name")
        try:
            TopicArn.parse(self.topic_arn)
        except ConfigError:
            raise ConfigError(f"topic_arn {self.topic_arn!r} is not an SNS topic ARN") from None
        if not QUEUE_PREFIX_PATTERN.match(self.queue_prefix):
            raise ConfigError(
                f"queue_prefix {self.queue_prefix!r} must be letters and digits joined by single '-' or '_' ('--' separates queue name parts)"
            )

    @property
    def channels(self) -> tuple[Channel, ...]:
        return tuple(Channel(self.stage, self.role, c) for c in self.components)

    def queue_name(self, instance_id: str) -> str:
        return queue_name(self.queue_prefix, self.stage, self.role, instance_id)


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return config_from_dict(yaml_mapping(text, what=f"config {path}", error=ConfigError), source=str(path))


def config_from_dict(doc: dict[str, Any], source: str = "config") -> AgentConfig:
    known = {f.name: f for f in fields(AgentConfig)}
    unknown = sorted(str(k) for k in set(doc) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s): {', '.join(unknown)}")
    missing = [name for name in ("stage", "role", "components", "bucket", "topic_arn") if name not in doc]
    if missing:
        raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
    values: dict[str, Any] = {}
    for name, value in doc.items():
        values[name] = _coerce(name, value, source)
    return AgentConfig(**values)


def _components(value: Any, name: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {name} must be a list of names, got {value!r}")
    return tuple(value)


def _integer(value: Any, name: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    return value


def _seconds(value: Any, name: str, source: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be a number of seconds, got {value!r}")
    return float(value)


def _flag(value: Any, name: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    return value


def _path(value: Any, name: str, source: str) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {name} must be a path, got {value!r}")
    return Path(value)


def _target_groups(value: Any, name: str, source: str) -> tuple[str, ...] | str:
    if value == AUTO_TARGET_GROUPS:
        return AUTO_TARGET_GROUPS
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{source}: {name} must be a list of target group ARNs or {AUTO_TARGET_GROUPS!r}, got {value!r}"
        )
    return tuple(value)


def _optional_integer(value: Any, name: str, source: str) -> int | None:
    return None if value is None else _integer(value, name, source)


def _optional_seconds(value: Any, name: str, source: str) -> float | None:
    return None if value is None else _seconds(value, name, source)


def _string(value: Any, name: str, source: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    return value


#: How each key is read from YAML; every other key is an optional string.
_READERS: dict[str, Callable[[Any, str, str], Any]] = {
    "components": _components,
    "poll_wait_seconds": _integer,
    "visibility_timeout_seconds": _integer,
    "max_receive_count": _integer,
    **{name: _seconds for name in _POSITIVE},
    "state_dir": _path,
    "root_dir": _path,
    "deregister_on_shutdown": _flag,
    "scale_in_protection": _flag,
    "allow_http_manifests": _flag,
    "trust_file": _path,
    "metrics_textfile": _path,
    "require_signatures": _flag,
    "target_group_arns": _target_groups,
    "traffic_port": _optional_integer,
    "traffic_healthy_timeout_seconds": _optional_seconds,
}


def _coerce(name: str, value: Any, source: str) -> Any:
    reader: Callable[[Any, str, str], Any] = _READERS.get(name, _string)
    return reader(value, name, source)
