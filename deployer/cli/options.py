"""Options shared by the commands, each declared once, each handed to a command as one value.

`store_options` turns --bucket/--prefix/--region/--endpoint-url into a `Store` (the context a
fleet command works in: bucket, key layout, clients), `channel_options` turns
--stage/--role/--component into a `Channel`, `wait_options` turns the five --wait flags into
one frozen `publisher.wait.WaitOptions` (or None without --wait). No command takes more than
a handful of parameters.

Nothing here imports the publisher or the agent: `deployer agent` loads this module too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deployer import logs
from deployer.protocol.errors import DeployerError
from deployer.protocol.layout import Layout
from deployer.protocol.names import DEFAULT_PREFIX, DEFAULT_QUEUE_PREFIX, TARGET_GROUP_ARN, Channel, check_name
from deployer.protocol.report import DEFAULT_HEARTBEAT_TTL_SECONDS
from deployer.protocol.rollout import MAX_ABORT_AFTER

if TYPE_CHECKING:
    from deployer.aws.clients import Clients
    from publisher.notify import Herald, NotifyTarget
    from publisher.signing import Signer

Command = Callable[..., Any]

#: --wait defaults (the heartbeat TTL's is the report contract's).
DEFAULT_WAIT_TIMEOUT_SECONDS = 900.0
DEFAULT_POLL_SECONDS = 5.0
WAIT_EXIT_HELP = "Exit codes with --wait: 0 every expected instance converged, 4 some failed, were rejected or were lost, 5 timed out (1 error)."


@dataclass(frozen=True)
class Aws:
    region: str | None
    endpoint_url: str | None

    def clients(self) -> Clients:
        from deployer.aws.clients import make_clients

        return make_clients(self.region, self.endpoint_url)


@dataclass(frozen=True)
class Store:
    """Where a fleet lives: its bucket, the key layout under its prefix, and clients to reach it."""

    bucket: str
    prefix: str
    aws: Aws

    @property
    def layout(self) -> Layout:
        return Layout(self.prefix)

    @cached_property
    def clients(self) -> Clients:
        return self.aws.clients()

    @property
    def page_url(self) -> str:
        """Where an operator opens the fleet page (`deployer status --upload`): the S3 console's
        object view, or the emulator's URL of the object."""
        key = self.layout.fleet_page_key()
        if self.aws.endpoint_url:
            return f"{self.aws.endpoint_url.rstrip('/')}/{self.bucket}/{key}"
        region = self.aws.region or "us-east-1"
        return f"https://{region}.console.aws.amazon.com/s3/object/{self.bucket}?region={region}&prefix={key}"

    def signers(self, specs: tuple[str, ...]) -> list[Signer]:
        """`--sign-key` values as signers (a KMS key is asked for its public half at once)."""
        from publisher.signing import signer_from_spec

        return [signer_from_spec(spec, self.aws.region, self.aws.endpoint_url) for spec in specs]


def _apply(func: Command, options: list[Callable[[Command], Command]]) -> Command:
    for option in reversed(options):
        func = option(func)
    return func


def _aws_flags() -> list[Callable[[Command], Command]]:
    return [
        click.option("--region", envvar=["AWS_REGION", "AWS_DEFAULT_REGION"], help="AWS region."),
        click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="AWS endpoint (the emulator's URL in tests)."),
    ]


def bucket_option(help: str = "Release/status bucket [env DEPLOYER_BUCKET].") -> Callable[[Command], Command]:
    return click.option("--bucket", envvar="DEPLOYER_BUCKET", required=True, help=help)


def prefix_option() -> Callable[[Command], Command]:
    return click.option(
        "--prefix",
        envvar="DEPLOYER_PREFIX",
        default=DEFAULT_PREFIX,
        show_default=True,
        help="Key prefix in the bucket.",
    )


def topic_option(required: bool = True) -> Callable[[Command], Command]:
    return click.option(
        "--topic-arn", envvar="DEPLOYER_TOPIC_ARN", required=required, help="SNS topic [env DEPLOYER_TOPIC_ARN]."
    )


queue_prefix_option = click.option(
    "--queue-prefix", default=DEFAULT_QUEUE_PREFIX, show_default=True, help="The agents' queue_prefix."
)
publisher_arn_option = click.option(
    "--publisher-arn",
    "publisher_arns",
    multiple=True,
    help="An IAM role or user ARN allowed to publish deploys (repeatable); none: the account's IAM decides.",
)


#: Where `--sign-key` is read from when not given.
SIGN_KEY_ENV = "DEPLOYER_SIGN_KEY"


def sign_key_option(help: str) -> Callable[[Command], Command]:
    return click.option(
        "--sign-key",
        "sign_keys",
        multiple=True,
        envvar=SIGN_KEY_ENV,
        metavar="kms:KEY|file:PATH",
        help=help + f" Repeatable, for a threshold of signers [env {SIGN_KEY_ENV}].",
    )


#: Opt-in until every agent of the fleet reads the deploy document's `manifest` key (README, "Upgrading").
INLINE_MANIFEST_ENV = "DEPLOYER_INLINE_MANIFEST"

inline_manifest_option = click.option(
    "--inline-manifest/--no-inline-manifest",
    "inline_manifest",
    default=False,
    envvar=INLINE_MANIFEST_ENV,
    help="Carry a small manifest (≤ 4 KiB) inside the deploy document, saving every agent a GET. Needs "
    f"agents that read it: upgrade agents first [env {INLINE_MANIFEST_ENV}; default: off].",
)


def aws_options(func: Command) -> Command:
    """--region and --endpoint-url, passed as `aws`."""

    @functools.wraps(func)
    def wrapper(*args: Any, region: str | None, endpoint_url: str | None, **kwargs: Any) -> Any:
        return func(*args, aws=Aws(region, endpoint_url), **kwargs)

    return _apply(wrapper, _aws_flags())


def store_options(func: Command) -> Command:
    """--bucket, --prefix, --region and --endpoint-url, passed as `store`."""
    return _store_options(func, required=True)


def targets_store_options(func: Command) -> Command:
    """`store_options` and --targets/--target, passed as `store` and `targets`, for the commands that
    move a channel in one fleet or in several: --bucket is required only without targets (each
    target names its own; --prefix, --region and --endpoint-url still say where the CLI itself is)."""

    @functools.wraps(func)
    def wrapper(*args: Any, targets_file: Path | None, target_specs: tuple[str, ...], **kwargs: Any) -> Any:
        from deployer.protocol.targets import check_targets, parse_fleet_definition, parse_target_option

        if targets_file is not None and target_specs:
            raise click.UsageError("give the targets in a file (--targets) or as --target options, not both")
        targets: tuple[Any, ...] = ()
        try:
            if targets_file is not None:
                targets = parse_fleet_definition(targets_file.read_bytes())
            elif target_specs:
                targets = check_targets([parse_target_option(spec) for spec in target_specs])
        except DeployerError as exc:
            raise click.BadParameter(str(exc), param_hint="--targets/--target") from None
        if not targets and not kwargs["store"].bucket:
            raise click.UsageError("Missing option '--bucket' (or --targets / --target for several fleets)")
        if not targets and "topic_arn" in kwargs and not kwargs["topic_arn"]:
            raise click.UsageError("Missing option '--topic-arn' (or --targets / --target for several fleets)")
        return func(*args, targets=targets, **kwargs)

    return _store_options(
        _apply(
            wrapper,
            [
                click.option(
                    "--targets",
                    "targets_file",
                    type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help="A fleet definition (YAML): the regions and accounts the channel lives in, moved as waves.",
                ),
                click.option(
                    "--target",
                    "target_specs",
                    multiple=True,
                    metavar="name=…,region=…,bucket=…,topic=…[,role=…,external_id=…,wave=N]",
                    help="One target of the fleet, in order; repeatable (instead of --targets).",
                ),
            ],
        ),
        required=False,
    )


@dataclass(frozen=True)
class Where:
    """One fleet a command works on: its label (for a header), clients (as the target's role),
    bucket, topic and key layout."""

    label: str
    clients: Clients
    bucket: str
    topic_arn: str
    layout: Layout


def fleets(store: Store, targets: tuple[Any, ...], topic_arn: str | None = None) -> list[Where]:
    """The fleets a command works on: the store's one, or each target, connected (a target in
    another account through its role)."""
    if not targets:
        return [Where(store.bucket, store.clients, store.bucket, topic_arn or "", store.layout)]
    from publisher.targets import connect  # only commands given targets load the publisher

    found = []
    for target in targets:
        reach = connect(target, store.aws.endpoint_url)
        p = reach.publisher
        found.append(Where(reach.label(), p.clients, p.bucket, p.topic_arn, p.layout))
    return found


def _store_options(func: Command, *, required: bool) -> Command:
    @functools.wraps(func)
    def wrapper(
        *args: Any, bucket: str | None, prefix: str, region: str | None, endpoint_url: str | None, **kwargs: Any
    ) -> Any:
        return func(*args, store=Store(bucket or "", prefix, Aws(region, endpoint_url)), **kwargs)

    bucket = click.option(
        "--bucket", envvar="DEPLOYER_BUCKET", required=required, help="Release/status bucket [env DEPLOYER_BUCKET]."
    )
    return _apply(wrapper, [bucket, prefix_option(), *_aws_flags()])


def name_callback(kind: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """Validate a stage/role/component flag with the protocol's own name rule."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_name(kind, value)
        except DeployerError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def channel_options(func: Command) -> Command:
    """--stage, --role, --component (all required), passed as `channel`."""

    @functools.wraps(func)
    def wrapper(*args: Any, stage: str, role: str, component: str, **kwargs: Any) -> Any:
        return func(*args, channel=Channel(stage, role, component), **kwargs)

    return _apply(
        wrapper,
        [
            click.option(f"--{kind}", required=True, callback=name_callback(kind))
            for kind in ("stage", "role", "component")
        ],
    )


def wait_options(func: Command) -> Command:
    """The --wait flags, declared once for every command that moves a pointer, passed as `wait`
    (a `publisher.wait.WaitOptions`, or None without --wait)."""

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        wait: bool,
        timeout: float,
        heartbeat_ttl: float,
        poll_interval: float,
        allow_lost: bool,
        asg: str | None,
        **kwargs: Any,
    ) -> Any:
        if not wait:  # the waiter and the fleet reader it brings are loaded only to wait
            return func(*args, wait=None, **kwargs)
        from publisher.wait import WaitOptions

        return func(*args, wait=WaitOptions(timeout, heartbeat_ttl, poll_interval, allow_lost, asg), **kwargs)

    return _apply(
        wrapper,
        [
            click.option("--wait", is_flag=True, help="Follow the deploy until the fleet converged. " + WAIT_EXIT_HELP),
            click.option(
                "--timeout",
                default=DEFAULT_WAIT_TIMEOUT_SECONDS,
                show_default=True,
                type=click.FloatRange(min=0),
                help="Seconds --wait waits before exiting 5.",
            ),
            click.option(
                "--heartbeat-ttl",
                default=DEFAULT_HEARTBEAT_TTL_SECONDS,
                show_default=True,
                type=click.FloatRange(min=1),
                help="An instance is live while its heartbeat is younger than this: expected if live at publish, lost if it stops being live.",
            ),
            click.option(
                "--poll-interval",
                default=DEFAULT_POLL_SECONDS,
                show_default=True,
                type=click.FloatRange(min=0.1),
                help="Status poll period.",
            ),
            click.option("--allow-lost", is_flag=True, help="Do not count instances lost mid-deploy as failures."),
            click.option(
                "--asg",
                metavar="NAME",
                help="Also expect every InService instance of this Auto Scaling group: one that never "
                "reports is pending for --heartbeat-ttl, then lost (without it, only instances that reported are seen).",
            ),
        ],
    )


def rollout_options(func: Command) -> Command:
    """--waves and its gates, passed as `gates` (a `publisher.rollout.Gates`, or None without --waves)."""

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        waves: str | None,
        bake: float,
        max_failed: str,
        progress_deadline: float,
        alarms: tuple[str, ...],
        lease: float,
        target_groups: tuple[str, ...],
        min_healthy_percent: float,
        abort_after: int | None,
        **kwargs: Any,
    ) -> Any:
        gates = None
        if waves:
            from publisher.rollout import Gates  # only commands that publish load the publisher

            specs = tuple(w.strip() for w in waves.split(",") if w.strip())
            gates = Gates(
                specs,
                bake,
                max_failed,
                progress_deadline,
                alarms,
                lease,
                min_healthy_percent=min_healthy_percent,
                target_groups=target_groups,
                abort_after=abort_after,
            )
        elif abort_after is not None:
            raise click.UsageError("--abort-after is a staged rollout's rule: it needs --waves")
        elif target_groups:
            raise click.UsageError("--target-group and --min-healthy-percent hold waves: they need --waves")
        return func(*args, gates=gates, **kwargs)

    return _apply(
        wrapper,
        [
            *capacity_options(),
            click.option(
                "--waves",
                metavar="SPECS",
                help="Stage the deploy: comma-separated waves, each an instance count or a percentage of the live "
                "instances, e.g. 1,10%,50%,100%. Wave 1 is chosen from live heartbeats and never empty.",
            ),
            click.option(
                "--bake",
                default=0.0,
                show_default=True,
                type=click.FloatRange(min=0),
                help="Seconds to watch each converged wave before the next.",
            ),
            click.option(
                "--max-failed",
                default="0",
                show_default=True,
                help="Failed instances tolerated per rollout: a count, or a percentage of the live ones.",
            ),
            click.option(
                "--progress-deadline",
                default=900.0,
                show_default=True,
                type=click.FloatRange(min=1),
                help="Seconds a wave may take to converge before the rollout is rolled back.",
            ),
            click.option(
                "--alarm",
                "alarms",
                multiple=True,
                metavar="NAME",
                help="A CloudWatch alarm in ALARM during the rollout rolls it back; repeatable.",
            ),
            click.option(
                "--lease",
                default=60.0,
                show_default=True,
                type=click.FloatRange(min=1),
                help="Seconds a driver's claim on the rollout lasts unrenewed.",
            ),
            click.option(
                "--abort-after",
                type=click.IntRange(min=1, max=MAX_ABORT_AFTER),
                metavar="K",
                help="Pre-authorised abort, signed into the plan: once K distinct admitted instances report the "
                "candidate failed, every instance returns to stable by itself, even with no driver running "
                "(agents must be upgraded first). K ≥ 2 tolerates a forged failure.",
            ),
        ],
    )


def capacity_options() -> list[Callable[[Command], Command]]:
    """--target-group and --min-healthy-percent: the load balancer capacity a wave must leave."""
    return [
        click.option(
            "--target-group",
            "target_groups",
            multiple=True,
            metavar="ARN",
            callback=_target_groups,
            help="A load balancer target group the fleet serves in: a wave starts only if it leaves "
            "--min-healthy-percent of its targets healthy; repeatable.",
        ),
        click.option(
            "--min-healthy-percent",
            default=90.0,
            show_default=True,
            type=click.FloatRange(min=0, max=100),
            help="With --target-group: the share of each group's registered targets that must stay healthy "
            "while a wave is out of service; one target may always leave (like instance refresh's "
            "MinHealthyPercentage).",
        ),
    ]


def capacity_flags(func: Command) -> Command:
    """`capacity_options` as one decorator (for `rollout resume`)."""
    return _apply(func, capacity_options())


def _target_groups(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for arn in value:
        if not TARGET_GROUP_ARN.match(arn):
            raise click.BadParameter(f"{arn!r} is not an ELBv2 target group ARN")
    return value


#: Where `--event-bus` and `--notify` are read from when not given (DEPLOYER_NOTIFY: space-separated).
EVENT_BUS_ENV, NOTIFY_ENV = "DEPLOYER_EVENT_BUS", "DEPLOYER_NOTIFY"


@dataclass(frozen=True)
class News:
    """Who hears of a deploy: an EventBridge bus (name or ARN) and `--notify` targets, checked."""

    bus: str | None = None
    notify: tuple[NotifyTarget, ...] = ()

    def herald(self, store: Store, by: str | None = None) -> Herald:
        """The sender for these sinks; clients are made only for the sinks that are set."""
        from deployer.aws.clients import events_client
        from publisher.notify import Herald, Topic

        return Herald(
            bus=self.bus,
            targets=self.notify,
            events_client=functools.partial(events_client, store.aws.region, store.aws.endpoint_url),
            sns=store.clients.sns if any(isinstance(t, Topic) for t in self.notify) else None,
            page=store.page_url,
            by=by,
        )


def news_options(func: Command) -> Command:
    """--event-bus and --notify, passed as `news`."""

    @functools.wraps(func)
    def wrapper(*args: Any, event_bus: str | None, notify: tuple[str, ...], **kwargs: Any) -> Any:
        targets: tuple[NotifyTarget, ...] = ()
        if notify:  # publisher.notify loads boto3, which `publish` imports while it hashes
            from publisher.notify import parse_notify_target

            try:
                targets = tuple(parse_notify_target(spec) for value in notify for spec in value.split())
            except DeployerError as exc:
                raise click.BadParameter(str(exc), param_hint="--notify") from None
        return func(*args, news=News(event_bus or None, targets), **kwargs)

    return _apply(
        wrapper,
        [
            click.option(
                "--event-bus",
                envvar=EVENT_BUS_ENV,
                metavar="BUS",
                help=f"Send every deploy event to this EventBridge bus (`default`, a name or an ARN) [env {EVENT_BUS_ENV}].",
            ),
            click.option(
                "--notify",
                multiple=True,
                envvar=NOTIFY_ENV,
                metavar="TARGET",
                help='Tell an SNS topic ARN or an https:// webhook (Slack-compatible `{"text": …}`) of holds, '
                f"rollbacks, failures and successes; repeatable; never fails the deploy [env {NOTIFY_ENV}].",
            ),
        ],
    )


def log_options(func: Command) -> Command:
    """--log-json/--log-console and --log-level for the long-running commands; configures logging."""

    @functools.wraps(func)
    def wrapper(*args: Any, log_json: bool | None, log_level: str, **kwargs: Any) -> Any:
        logs.configure(json=log_json, level=log_level)
        return func(*args, **kwargs)

    return _apply(
        wrapper,
        [
            click.option(
                "--log-json/--log-console", default=None, help="Log format (default: JSON unless stderr is a TTY)."
            ),
            click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])),
        ],
    )


def quiet(func: Command) -> Command:
    """Operator commands print their own output; only warnings and errors are logged."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logs.configure(level="warning")
        return func(*args, **kwargs)

    return wrapper
