"""Telling people what happened: every deploy event to EventBridge, the notified ones to `--notify`.

A deploy never fails because its news could not be told. Each sink gets a few bounded attempts
under the one retry policy (a throttle, a 5xx, a reset), then the failure is logged with
`next=` and the command carries on; the pointer, the cursor and the exit code are what
matter, and they are already written when an event is sent. The cost of that bound is the
driver's time: an unreachable webhook holds a wave's next poll by at most
NOTIFY_POLICY's deadline per sink.

A webhook URL is a credential (Slack's carries its token in the path), so it is never logged
whole: only its scheme and host.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from deployer.aws.events import put_event
from deployer.aws.retry import RetryPolicy
from deployer.protocol.errors import ConfigError
from deployer.protocol.events import NOTIFIED, DeployEvent
from deployer.protocol.names import TopicArn

if TYPE_CHECKING:
    from mypy_boto3_events import EventBridgeClient
    from mypy_boto3_sns import SNSClient

log = structlog.get_logger(__name__)

#: Attempts and time one sink gets per event before the failure is logged and left.
NOTIFY_POLICY = RetryPolicy(max_attempts=3, base_seconds=0.5, cap_seconds=2.0, deadline_seconds=10.0)
#: Seconds a webhook may take to answer one attempt.
WEBHOOK_TIMEOUT_SECONDS = 5.0
#: SNS Publish's Subject: at most 100 printable ASCII characters.
#: https://docs.aws.amazon.com/sns/latest/api/API_Publish.html
MAX_SNS_SUBJECT_CHARS = 100
#: Hosts a plain-http webhook may name: loopback only (a local relay, the tests); anything else must be https.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class Webhook:
    url: str

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}/…"


@dataclass(frozen=True)
class Topic:
    arn: str

    def __str__(self) -> str:
        return self.arn


NotifyTarget = Webhook | Topic


def parse_notify_target(spec: str) -> NotifyTarget:
    """`--notify` value: an SNS topic ARN, or an https URL (http only on loopback)."""
    if spec.startswith("arn:"):
        try:
            return Topic(str(TopicArn.parse(spec)))
        except ConfigError as exc:
            raise ConfigError(f"--notify: {exc}") from None
    parts = urlsplit(spec)
    if parts.scheme == "https" and parts.hostname:
        return Webhook(spec)
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return Webhook(spec)
    raise ConfigError(
        f"--notify {Webhook(spec) if parts.hostname else spec[:40]!s}: give an SNS topic ARN or an https:// webhook URL"
    )


def post_webhook(url: str, text: str, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> None:
    """POST `{"text": …}` (Slack's incoming-webhook shape; Teams, Mattermost and Discord's
    Slack-compatible endpoints take it too). A non-2xx answer raises urllib's HTTPError, which
    the retry policy retries when it is a 429 or a 5xx."""
    body = json.dumps({"text": text}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read(1024)
    except urllib.error.HTTPError as refused:
        refused.close()  # it holds the connection: each failed attempt would leak a socket
        raise


@dataclass
class Herald:
    """Sends a command's events: all of them to `bus` (when set), the NOTIFIED ones to each target.

    `page` (the fleet page's address) and `by` (who sends) are filled into every event.
    """

    bus: str | None = None
    targets: Sequence[NotifyTarget] = ()
    events_client: Callable[[], EventBridgeClient] | None = None
    sns: SNSClient | None = None
    page: str | None = None
    by: str | None = None
    policy: RetryPolicy = NOTIFY_POLICY
    post: Callable[[str, str], None] = post_webhook
    _client: EventBridgeClient | None = field(default=None, repr=False)

    def emit(self, event: DeployEvent, *, notify: bool | None = None) -> None:
        """Send `event`; `notify` overrides whether `--notify` targets hear of it. Never raises."""
        event = replace(event, page=event.page or self.page, by=event.by or self.by).fitted()
        if self.bus is not None and self.events_client is not None:
            bus, client = self.bus, self._events
            self._attempt(f"EventBridge bus {bus}", lambda: put_event(client(), bus, event, self.policy), event)
        if not (event.type in NOTIFIED if notify is None else notify):
            return
        for target in self.targets:
            self._attempt(str(target), functools.partial(self._tell, target, event), event)

    def _events(self) -> EventBridgeClient:
        """One client for the command's life, made at the first event (40-80 ms of botocore setup
        that would otherwise delay every event after its decision)."""
        if self._client is None:
            assert self.events_client is not None
            self._client = self.events_client()
        return self._client

    def _tell(self, target: NotifyTarget, event: DeployEvent) -> None:
        text = event.chat_text()
        if isinstance(target, Webhook):
            self.policy.call(self.post, target.url, text)
        elif self.sns is not None:
            subject = f"deployer: {event.type.value} {event.stage}/{event.role}/{event.component}"
            self.policy.call(
                self.sns.publish, TopicArn=target.arn, Message=text, Subject=subject[:MAX_SNS_SUBJECT_CHARS]
            )

    def _attempt(self, sink: str, send: Callable[[], object], event: DeployEvent) -> None:
        try:
            send()
        except Exception as exc:  # noqa: BLE001 — news that could not be told never fails a deploy
            log.warning(
                "event_not_delivered",
                sink=sink,
                event_type=event.type.value,
                event_id=event.event_id,
                error=f"{type(exc).__name__}: {str(exc)[:300]}",
                next="the deploy carries on; the event is lost for this sink (the pointer and cursor still tell)",
            )
