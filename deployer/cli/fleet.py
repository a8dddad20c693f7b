"""Commands for operators looking after a fleet: `deployer status`, `gc`, `iam-policy` and `doctor`."""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from deployer.cli.options import (
    Aws,
    Command,
    Store,
    aws_options,
    bucket_option,
    fleets,
    name_callback,
    prefix_option,
    publisher_arn_option,
    queue_prefix_option,
    quiet,
    targets_store_options,
    topic_option,
)
from deployer.protocol.errors import ConfigError
from deployer.protocol.names import DEFAULT_METRICS_NAMESPACE, check_metrics_namespace
from deployer.protocol.report import DEFAULT_GC_TTL_SECONDS, MIN_GC_TTL_SECONDS
from deployer.protocol.retention import DEFAULT_KEEP, DEFAULT_OLDER_THAN_DAYS, MIN_OLDER_THAN_DAYS

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from deployer.protocol.deploy import Deploy
    from deployer.protocol.layout import Layout
    from deployer.protocol.names import Channel
    from deployer.protocol.targets import Target
    from publisher.fleet import Row
    from publisher.iam import Scope

#: `deployer doctor`'s exit code when the role would be denied something (1 is an error).
DOCTOR_DENIED_EXIT = 3
#: A command, whose type an option decorator keeps.
F = TypeVar("F", bound=Command)
#: Where `--metrics-namespace` is read from when not given.
METRICS_NAMESPACE_ENV = "DEPLOYER_METRICS_NAMESPACE"


def _metrics_namespace(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_metrics_namespace(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def metrics_namespace_option(help: str) -> Callable[[F], F]:
    """--metrics-namespace, the same for `status --metrics` and the policies that let it put there."""
    return click.option(
        "--metrics-namespace",
        envvar=METRICS_NAMESPACE_ENV,
        default=DEFAULT_METRICS_NAMESPACE,
        show_default=True,
        callback=_metrics_namespace,
        help=f"{help} [env {METRICS_NAMESPACE_ENV}]",
    )


@click.command()
@targets_store_options
@click.option("--stage", callback=name_callback("stage"))
@click.option("--role", callback=name_callback("role"))
@click.option("--component", callback=name_callback("component"))
@click.option(
    "--stale-after",
    default=3600.0,
    show_default=True,
    help="Seconds without a heartbeat before an instance is marked stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the fleet page (one self-contained HTML file, no script) here instead of printing the table.",
)
@click.option(
    "--upload",
    is_flag=True,
    help="Put the fleet page into the bucket at <prefix>/fleet/index.html (needs s3:PutObject on that key).",
)
@click.option(
    "--metrics",
    is_flag=True,
    help="Also put each channel's gauges (OnCurrent, Behind, Failed, Stale, Live, ConvergedPercent) into "
    "CloudWatch (needs cloudwatch:PutMetricData in --metrics-namespace).",
)
@metrics_namespace_option("The CloudWatch namespace --metrics puts the gauges into.")
@quiet
def status(
    store: Store,
    targets: tuple[Target, ...],
    stage: str | None,
    role: str | None,
    component: str | None,
    stale_after: float,
    as_json: bool,
    html_path: Path | None,
    upload: bool,
    metrics: bool,
    metrics_namespace: str,
) -> None:
    """Where the fleet stands: instances × components, with a summary per channel.

    --html and --upload render the same view as a page: a grid per stage/role coloured by state,
    each channel's pointer and summary, a staged rollout's waves, stale instances and last errors.
    --metrics also puts each channel's gauges into CloudWatch, stamped with the time the reports
    were read, for an alarm on convergence (one line says what was put; on stderr with --json).
    """
    from publisher.fleet import format_table, summary

    if as_json and (html_path or upload):
        raise click.UsageError("--json prints the fleet; --html/--upload render it as a page: choose one")
    if upload and (stage or role or component):
        raise click.UsageError("--upload replaces the whole fleet's page: drop --stage, --role and --component")
    if targets:
        if metrics:
            raise click.UsageError("--metrics puts one fleet's gauges in its region: run it per target")
        _targets_status(store, targets, stage, role, component, stale_after, as_json, html_path, upload)
        return
    read_at = datetime.now(UTC)
    rows, pointers = _read_fleet(
        store.clients.s3, store.bucket, store.layout, stage, role, component, stale_after, read_at
    )
    if html_path or upload:
        _page(store, rows, pointers, html_path, upload)
    elif as_json:
        click.echo(json.dumps({"instances": [r.as_dict() for r in rows], "summary": summary(rows)}, indent=2))
    elif not rows:
        click.echo("no instances have reported yet")
    else:
        click.echo(format_table(rows))
        click.echo()
        for line in summary(rows):
            click.echo(line)
    if metrics:
        # After the view, so an operator sees the fleet even when CloudWatch refuses the gauges.
        _put_metrics(store, rows, read_at, metrics_namespace, err=as_json)


def _targets_status(
    store: Store,
    targets: tuple[Target, ...],
    stage: str | None,
    role: str | None,
    component: str | None,
    stale_after: float,
    as_json: bool,
    html_path: Path | None,
    upload: bool,
) -> None:
    """Every target's fleet, read side by side: one section (one JSON key, one part of the page)
    per target, each saying its region and account; the page goes to the first target's bucket."""
    from concurrent.futures import ThreadPoolExecutor

    from publisher.fleet import format_table, summary
    from publisher.page import FleetView, render_views
    from publisher.rollout import rollout_cursors
    from publisher.targets import Reach, connect

    def read(target: Target) -> tuple[Reach, FleetView]:
        reach = connect(target, store.aws.endpoint_url)
        p = reach.publisher
        now = datetime.now(UTC)
        rows, pointers = _read_fleet(p.clients.s3, p.bucket, p.layout, stage, role, component, stale_after, now)
        cursors = rollout_cursors(p.clients.s3, p.bucket, p.layout, pointers) if html_path or upload else {}
        return reach, FleetView(reach.label(), rows, pointers, cursors)

    with ThreadPoolExecutor(min(8, len(targets)), thread_name_prefix="status") as pool:
        views = list(pool.map(read, targets))
    if html_path or upload:
        data = render_views([view for _, view in views], generated_at=datetime.now(UTC)).encode()
        first = views[0][0].publisher
        _deliver_page(data, f"{len(views)} target(s)", html_path, upload, first.clients.s3, first.bucket, first.layout)
    elif as_json:
        click.echo(
            json.dumps(
                {
                    reach.target.name: {
                        "region": reach.target.region,
                        "account": reach.target.topic_arn.split(":")[4],
                        "instances": [r.as_dict() for r in view.rows],
                        "summary": summary(view.rows),
                    }
                    for reach, view in views
                },
                indent=2,
            )
        )
    else:
        for _, view in views:
            rows = list(view.rows)
            click.echo(f"== {view.label}")
            click.echo(format_table(rows) if rows else "no instances have reported yet")
            for line in summary(rows):
                click.echo(line)
            click.echo()


def _put_metrics(store: Store, rows: list[Row], read_at: datetime, namespace: str, err: bool) -> None:
    """Put the channels' gauges into `namespace`; one line says what (on stderr beside --json's document)."""
    from deployer.aws.clients import cloudwatch_client
    from deployer.aws.cloudwatch import put_gauges
    from publisher.fleet import fleet_gauges

    gauges = fleet_gauges(rows, read_at)
    if gauges:
        put_gauges(cloudwatch_client(store.aws.region, store.aws.endpoint_url), namespace, gauges)
    channels = len({gauge.dimensions for gauge in gauges})
    click.echo(f"put {len(gauges)} metric(s) for {channels} channel(s) into namespace {namespace}", err=err)


def _page(store: Store, rows: list[Row], pointers: Mapping[Channel, Deploy], path: Path | None, upload: bool) -> None:
    """Render the fleet page once; write it to `path` and/or put it next to the status reports."""
    from publisher.page import render_page
    from publisher.rollout import rollout_cursors

    cursors = rollout_cursors(store.clients.s3, store.bucket, store.layout, pointers)
    source = f"s3://{store.bucket}/{store.layout.key()}".rstrip("/")
    body = render_page(rows, generated_at=datetime.now(UTC), pointers=pointers, cursors=cursors, source=source)
    instances = len({(r.stage, r.role, r.instance_id) for r in rows})
    _deliver_page(body.encode(), f"{instances} instance(s)", path, upload, store.clients.s3, store.bucket, store.layout)


def _deliver_page(
    data: bytes, what: str, path: Path | None, upload: bool, s3: S3Client, bucket: str, layout: Layout
) -> None:
    """Write the rendered page to `path` and/or put it beside the status reports, saying where."""
    from deployer.aws.s3 import put_page

    if path is not None:
        path.write_bytes(data)
        click.echo(f"wrote {path} ({what}, {len(data)} bytes)")
    if upload:
        key = layout.fleet_page_key()
        put_page(s3, bucket, key, data)
        click.echo(f"uploaded s3://{bucket}/{key} ({what}, {len(data)} bytes)")


def _read_fleet(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    stage: str | None,
    role: str | None,
    component: str | None,
    stale_after: float,
    now: datetime,
) -> tuple[list[Row], dict[Channel, Deploy]]:
    """One fleet's rows (every report, compared with its channel's pointer) and those pointers."""
    from deployer.aws.reports import ReportReader
    from publisher.fleet import channels_of, fleet_rows
    from publisher.history import pointer_deploys

    entries = ReportReader(s3, bucket, layout, stage, role).refresh()
    pointers = pointer_deploys(s3, bucket, layout, channels_of(entries.values()))
    return fleet_rows(
        entries.values(), component=component, stale_after_s=stale_after, now=now, pointers=pointers
    ), pointers


class GcGroup(click.Group):
    """`gc instances` and `gc releases`; the old spelling `gc [--releases] …` still works, with a
    deprecation notice on stderr, so scheduled jobs keep running while they are updated."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] in self.commands or args[0] in ("--help", "-h"):
            return super().parse_args(ctx, args)
        chosen = "releases" if "--releases" in args else "instances"
        old = "gc --releases" if chosen == "releases" else "gc"
        click.echo(f"warning: `deployer {old}` is deprecated: use `deployer gc {chosen}`", err=True)
        return super().parse_args(ctx, [chosen, *(arg for arg in args if arg != "--releases")])


@click.group(cls=GcGroup)
def gc() -> None:
    """Housekeeping on a schedule: `gc instances` (silent instances) and `gc releases` (unused releases).

    Idempotent and safe to run on a schedule (cron, a scheduled Lambda), next to publishes.
    """


dry_run_option = click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@gc.command("instances")
@targets_store_options
@topic_option(required=False)
@queue_prefix_option
@click.option(
    "--ttl",
    default=DEFAULT_GC_TTL_SECONDS,
    show_default=True,
    type=click.FloatRange(min=MIN_GC_TTL_SECONDS),
    help=f"Seconds without a heartbeat after which an instance is collected (at least {MIN_GC_TTL_SECONDS:.0f}).",
)
@dry_run_option
@json_option
@quiet
def gc_instances(
    store: Store,
    targets: tuple[Target, ...],
    topic_arn: str,
    queue_prefix: str,
    ttl: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove subscriptions, then queues, then status reports of instances silent for longer than --ttl.

    Silent means both the report's heartbeat and the object's own LastModified are older than
    --ttl: a heartbeat written into a body is only a claim. With --targets, in every target, one
    after the other (a target in another account through its role, which then needs the gc policy).
    """
    from publisher.gc import Collector, describe

    found: dict[str, list[Any]] = {}
    for where in fleets(store, targets, topic_arn):
        removed = Collector(where.clients, where.bucket, where.topic_arn, where.layout, queue_prefix).run(
            ttl, dry_run=dry_run
        )
        found[where.label] = [dataclasses.asdict(r) for r in removed]
        if not as_json:
            if targets:
                click.echo(f"== {where.label}")
            for line in describe(removed, dry_run=dry_run):
                click.echo(line)
    if as_json:
        removed_json = found if targets else next(iter(found.values()))
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed_json}, indent=2))


@gc.command("releases")
@targets_store_options
@click.option(
    "--keep",
    default=DEFAULT_KEEP,
    show_default=True,
    type=click.IntRange(min=0),
    help="History entries per channel whose releases are kept (rollback targets).",
)
@click.option(
    "--older-than",
    "older_than_days",
    default=DEFAULT_OLDER_THAN_DAYS,
    show_default=True,
    type=click.FloatRange(min=MIN_OLDER_THAN_DAYS),
    help="Days since a release was uploaded before it may be collected.",
)
@click.option("--component", callback=name_callback("component"), help="Only this component's releases.")
@dry_run_option
@json_option
@quiet
def gc_releases(
    store: Store,
    targets: tuple[Target, ...],
    keep: int,
    older_than_days: float,
    component: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Delete the releases nothing refers to.

    A release is collected in two runs at least an hour apart: the first condemns it (a mark
    in S3), the second deletes it if nothing refers to it yet. Referring means: a channel's
    pointer (or its rollout's stable release), one of the last --keep history entries of a
    channel, or a status report.
    """
    from publisher.retention import ReleaseCollector, describe_releases

    found = {}
    for where in fleets(store, targets):
        outcome = ReleaseCollector(where.clients, where.bucket, where.layout).run(
            keep=keep, older_than_days=older_than_days, component=component, dry_run=dry_run
        )
        found[where.label] = outcome.to_dict()
        if not as_json:
            if targets:
                click.echo(f"== {where.label}")
            for line in describe_releases(outcome):
                click.echo(line)
    if as_json:
        click.echo(json.dumps(found if targets else next(iter(found.values())), indent=2))


def scope_options(func: Command) -> Command:
    """The names a policy is written for (`iam-policy`, `doctor`), passed as one `scope`."""

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        bucket: str,
        prefix: str,
        topic_arn: str,
        queue_prefix: str,
        stage: str | None,
        role: str | None,
        asg_name: str | None,
        lifecycle: bool,
        deregister: bool,
        terminate_hook: bool,
        scale_in_protection: bool,
        target_groups: tuple[str, ...],
        secrets: tuple[str, ...],
        publisher_arns: tuple[str, ...],
        sign_keys: tuple[str, ...],
        metrics_namespace: str,
        event_bus: str | None,
        notify_topics: tuple[str, ...],
        assume_roles: tuple[str, ...],
        external_id: str | None,
        **kwargs: Any,
    ) -> Any:
        from publisher.iam import Scope

        scope = Scope(
            bucket=bucket,
            topic_arn=topic_arn,
            prefix=prefix,
            queue_prefix=queue_prefix,
            stage=stage,
            role=role,
            asg_name=asg_name,
            lifecycle=lifecycle,
            deregister=deregister,
            terminate=terminate_hook,
            protect=scale_in_protection,
            target_groups=target_groups,
            secrets=secrets,
            publishers=publisher_arns,
            sign_keys=sign_keys,
            metrics_namespace=metrics_namespace,
            event_bus=event_bus,
            notify_topics=notify_topics,
            assume_roles=assume_roles,
            external_id=external_id,
        )
        return func(*args, scope=scope, **kwargs)

    options = [
        bucket_option(),
        prefix_option(),
        topic_option(),
        queue_prefix_option,
        click.option("--stage", callback=name_callback("stage"), help="CI/instance/gc: narrow to one stage."),
        click.option("--role", callback=name_callback("role"), help="Instance/gc: narrow to one role (with --stage)."),
        click.option(
            "--asg", "asg_name", help="Instance: allow completing the launch hook of this Auto Scaling group."
        ),
        click.option(
            "--lifecycle", is_flag=True, help="Instance: allow completing launch hooks (of --asg, else any group)."
        ),
        click.option(
            "--deregister", is_flag=True, help="Instance: allow deregister_on_shutdown (delete own queues/status)."
        ),
        click.option(
            "--terminate-hook",
            is_flag=True,
            help="Instance: allow leaving through the terminate lifecycle hook (queues removed, "
            "heartbeats, CONTINUE; of --asg, else any group).",
        ),
        click.option(
            "--scale-in-protection",
            is_flag=True,
            help="Instance: allow protecting itself from scale-in while a deploy runs (of --asg, else any group).",
        ),
        click.option(
            "--target-group",
            "target_groups",
            multiple=True,
            metavar="ARN|auto",
            help="Instance: allow leaving and rejoining this load balancer target group around a release "
            "switch (an ARN, * allowed; or auto: the Auto Scaling group's); repeatable. CI needs none: "
            "reading target health is always granted.",
        ),
        click.option(
            "--secrets",
            "secrets",
            multiple=True,
            metavar="ARN",
            help="Instance: allow reading this SSM parameter or Secrets Manager secret its manifests name "
            "(ARN, * allowed); repeatable.",
        ),
        publisher_arn_option,
        click.option(
            "--sign-key",
            "sign_keys",
            multiple=True,
            metavar="kms:KEY",
            help="CI: allow kms:Sign with this release key; trust: with this trust key (its id or ARN); repeatable.",
        ),
        metrics_namespace_option(
            "CI/gc: allow `status --metrics` to put its gauges into this CloudWatch namespace only."
        ),
        click.option(
            "--event-bus",
            metavar="BUS",
            help="CI: allow sending deploy events (source `deployer` only) to this EventBridge bus (name or ARN).",
        ),
        click.option(
            "--notify",
            "notify_topics",
            multiple=True,
            metavar="TOPIC_ARN",
            help="CI: allow telling this SNS topic of holds, rollbacks, failures and successes; repeatable "
            "(webhooks need no permission).",
        ),
        click.option(
            "--assume-role",
            "assume_roles",
            multiple=True,
            metavar="ROLE_ARN",
            help="CI: allow assuming this target account's CI role (`publish --targets`); repeatable.",
        ),
        click.option(
            "--external-id",
            help="target-trust: the external id the role's trust policy requires (the targets' external_id).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.command("iam-policy")
@click.option(
    "--for",
    "audience",
    required=True,
    type=click.Choice(["ci", "instance", "gc", "trust", "bucket", "topic", "target-trust"]),
    help="Who the policy is for: an identity policy (ci, instance, gc, trust) or a resource policy (bucket, "
    "topic; target-trust: the trust policy of a target account's CI role, for `publish --targets`).",
)
@scope_options
def iam_policy(audience: str, scope: Scope) -> None:
    """Print a least-privilege IAM policy (JSON): for CI, the instances, gc or trust key holders, or the bucket's or topic's policy."""
    from publisher.iam import Audience, policy_for, render

    click.echo(render(policy_for(Audience(audience), scope)))


@click.command()
@click.option(
    "--for",
    "examined",
    required=True,
    type=click.Choice(["ci", "instance", "gc", "trust"]),
    help="The role to examine: the same choice as `iam-policy --for`.",
)
@click.option(
    "--principal",
    help="The IAM role (or user) ARN to examine; default: the role behind the caller's credentials.",
)
@click.option(
    "--iam-endpoint-url",
    envvar="AWS_ENDPOINT_URL_IAM",
    help="IAM's endpoint, if not AWS's (neither emulator has the policy simulator) [env AWS_ENDPOINT_URL_IAM].",
)
@scope_options
@aws_options
def doctor(examined: str, principal: str | None, iam_endpoint_url: str | None, scope: Scope, aws: Aws) -> None:
    """Ask the account's IAM policy simulator whether a role may make every call the deployer makes.

    Read-only: it calls `iam:SimulatePrincipalPolicy` (and `sts:GetCallerIdentity` without
    --principal), which the caller needs; it changes nothing. Every denial is printed with the
    statement of `deployer iam-policy` that grants it. Exit 0 when everything is allowed, 3 when
    anything would be denied.
    """
    from deployer.aws.clients import iam_client, sts_client
    from deployer.aws.simulator import caller_principal, simulate
    from publisher.doctor import examine, report
    from publisher.iam import PRINCIPAL_ARN
    from publisher.iam_model import Context, Role

    chosen = principal or caller_principal(sts_client(aws.region, aws.endpoint_url))
    if not PRINCIPAL_ARN.match(chosen):
        raise ConfigError(f"--principal {chosen!r} is not an IAM role or user ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    iam = iam_client(aws.region, iam_endpoint_url or aws.endpoint_url)

    def ask(action: str, resource: str, context: Context) -> tuple[bool, str]:
        answer = simulate(iam, chosen, action, resource, context)
        return answer.allowed, answer.decision

    findings = examine(Role(examined), scope, ask)
    for line in report(Role(examined), chosen, findings, scope_flags(scope)):
        click.echo(line)
    if any(not f.allowed for f in findings):
        raise SystemExit(DOCTOR_DENIED_EXIT)


def scope_flags(scope: Scope) -> str:
    """The narrowing flags of `scope`, as `iam-policy` takes them (for the fix lines)."""
    flags = [f"--{name} {value}" for name, value in (("stage", scope.stage), ("role", scope.role)) if value]
    flags += [f"--asg {scope.asg_name}"] if scope.asg_name else []
    flags += ["--lifecycle"] if scope.lifecycle and not scope.asg_name else []
    flags += ["--deregister"] if scope.deregister else []
    flags += ["--terminate-hook"] if scope.terminate else []
    flags += ["--scale-in-protection"] if scope.protect else []
    flags += [f"--target-group {group}" for group in scope.target_groups]
    flags += [f"--secrets {secret}" for secret in scope.secrets]
    flags += [f"--sign-key {key}" for key in scope.sign_keys]
    if scope.metrics_namespace != DEFAULT_METRICS_NAMESPACE:
        flags.append(f"--metrics-namespace {shlex.quote(scope.metrics_namespace)}")
    flags += [f"--event-bus {scope.event_bus}"] if scope.event_bus else []
    flags += [f"--notify {topic}" for topic in scope.notify_topics]
    flags += [f"--assume-role {role}" for role in scope.assume_roles]
    return "".join(f" {flag}" for flag in flags)


COMMANDS = (status, gc, iam_policy, doctor)
