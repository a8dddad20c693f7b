"""What `publish` and `rollback` share after moving a pointer: the --wait flags, and the verdict."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from deployer.layout import Layout
from deployer.protocol import Deploy
from publisher.wait import DEFAULT_HEARTBEAT_TTL_SECONDS, DEFAULT_POLL_SECONDS, DEFAULT_WAIT_TIMEOUT_SECONDS

if TYPE_CHECKING:  # the agent imports this module too; it never needs the publisher loaded
    from deployer.aws import Clients
    from publisher.publish import PublishResult

#: Exit codes CI can branch on (the --wait ones are decided by publisher.wait).
EXIT_NOTIFY_FAILED = 3
WAIT_EXIT_HELP = "Exit codes with --wait: 0 every expected instance converged, 4 some failed, were rejected or were lost, 5 timed out (1 error)."


def wait_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The --wait flags, declared once for every command that moves a pointer."""
    for option in reversed(
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
        ]
    ):
        func = option(func)
    return func


def conclude(
    result: PublishResult,
    clients: Clients,
    bucket: str,
    prefix: str,
    *,
    wait: bool,
    timeout: float,
    heartbeat_ttl: float,
    poll_interval: float,
    allow_lost: bool,
) -> None:
    """Report a failed fan-out, then follow the fleet if asked; exits with the verdict's code."""
    deploy = result.deploy
    if result.sns_error:
        click.echo(
            f"error: the pointer moved to seq {deploy.seq} but the SNS publish failed ({result.sns_error}); "
            "agents will still converge at their next reconcile",
            err=True,
        )
        if not wait:
            sys.exit(EXIT_NOTIFY_FAILED)
    if wait:
        sys.exit(
            follow(
                clients,
                bucket,
                prefix,
                deploy,
                timeout=timeout,
                heartbeat_ttl=heartbeat_ttl,
                poll_interval=poll_interval,
                allow_lost=allow_lost,
            )
        )


def follow(
    clients: Clients,
    bucket: str,
    prefix: str,
    deploy: Deploy,
    *,
    timeout: float,
    heartbeat_ttl: float,
    poll_interval: float,
    allow_lost: bool,
) -> int:
    """Wait for `deploy` with a live display on stdout; returns the exit code."""
    from deployer.status import ReportCache
    from publisher.wait import ProgressPrinter, Waiter

    cache = ReportCache(clients.s3, bucket, Layout(prefix), deploy.stage, deploy.role)
    printer = ProgressPrinter(sys.stdout)
    waiter = Waiter(cache, heartbeat_ttl_s=heartbeat_ttl, poll_s=poll_interval, allow_lost=allow_lost)
    outcome = waiter.wait(deploy, timeout, printer)
    printer.finish(outcome)
    return outcome.exit_code
