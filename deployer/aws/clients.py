"""boto3 client construction: one place that decides endpoints, timeouts and retries."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import boto3
import botocore.session
from botocore.config import Config
from botocore.loaders import Loader
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from deployer import __version__
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import ConfigError, IncompleteAnswer
from deployer.protocol.limits import MAX_WAIT_TIME_SECONDS

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client
    from mypy_boto3_events import EventBridgeClient
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_kms import KMSClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_sts import STSClient

#: A stalled TCP connect fails fast; the retry policy tries again.
CONNECT_TIMEOUT_SECONDS = 5
#: Must outlast the 20 s SQS long poll or every idle receive would time out.
READ_TIMEOUT_SECONDS = MAX_WAIT_TIME_SECONDS + 10
#: Connections a client keeps for concurrent calls (fleet reads); botocore's default is 10. A
#: pool only grows with use, so an agent that calls one at a time still holds one or two.
MAX_POOL_CONNECTIONS = 64


C = TypeVar("C")

#: Fields a successful answer to these calls always carries; one that lacks them was cut short
#: (botocore parses a truncated answer into whatever it got, often nothing at all).
REQUIRED_OUTPUT: dict[tuple[str, str], tuple[str, ...]] = {
    ("s3", "GetObject"): ("ETag", "ContentLength"),
    ("s3", "HeadObject"): ("ETag", "ContentLength"),
    ("s3", "PutObject"): ("ETag",),
    ("s3", "ListObjectsV2"): ("IsTruncated",),
    ("sqs", "CreateQueue"): ("QueueUrl",),
    ("sqs", "GetQueueUrl"): ("QueueUrl",),
    ("sqs", "GetQueueAttributes"): ("Attributes",),
    ("sqs", "SendMessage"): ("MessageId",),
    ("sns", "CreateTopic"): ("TopicArn",),
    ("sns", "Subscribe"): ("SubscriptionArn",),
    ("sns", "Publish"): ("MessageId",),
    ("sns", "GetTopicAttributes"): ("Attributes",),
    ("sns", "ListSubscriptionsByTopic"): ("Subscriptions",),
    ("sts", "GetCallerIdentity"): ("UserId",),
    ("autoscaling", "DescribeAutoScalingInstances"): ("AutoScalingInstances",),
    ("autoscaling", "DescribeAutoScalingGroups"): ("AutoScalingGroups",),
    ("elbv2", "DescribeTargetHealth"): ("TargetHealthDescriptions",),
    ("elbv2", "DescribeTargetGroups"): ("TargetGroups",),
    ("elbv2", "DescribeTargetGroupAttributes"): ("Attributes",),
    ("ssm", "GetParameters"): ("Parameters",),
    ("secretsmanager", "GetSecretValue"): ("ARN",),
    ("kms", "GetPublicKey"): ("PublicKey", "KeyId"),
    ("kms", "Sign"): ("Signature",),
    ("iam", "SimulatePrincipalPolicy"): ("EvaluationResults",),
    ("sts", "AssumeRole"): ("Credentials",),
}
#: Protocols whose successful answers are never empty (JSON at least `{}`, XML a root element).
NON_EMPTY_PROTOCOLS = frozenset({"json", "query"})


def refuse_incomplete_answers(http_response: Any, parsed: Mapping[str, Any], model: Any, **_: Any) -> None:
    """botocore `after-call` hook: a 2xx answer that is visibly incomplete raises IncompleteAnswer.

    A connection closed cleanly (FIN) in the middle of an answer is not an error to urllib3 when
    the headers were cut, nor to botocore's parsers when the body was: the call "succeeds" with
    a partial or empty answer, and `response["QueueUrl"]` becomes a KeyError. Checked here, once,
    for every call of every client, the cut becomes a transient error the one retry policy
    retries. Streaming bodies (GetObject) are checked as they are read, against ContentLength.
    """
    if not 200 <= http_response.status_code < 300:
        return
    service, operation = model.service_model.service_name, model.name
    problem = None
    # A HEAD answer's Content-Length is the object's, not the (absent) body's.
    if not model.has_streaming_output and model.http.get("method") != "HEAD":
        body = http_response.content
        declared = http_response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) != len(body):
            problem = f"{len(body)} of the {declared} bytes it announced"
        elif not body and model.service_model.protocol in NON_EMPTY_PROTOCOLS:
            problem = "an empty body"
    missing = [field for field in REQUIRED_OUTPUT.get((service, operation), ()) if field not in parsed]
    if problem is None and missing:
        problem = f"no {', '.join(missing)}"
    if problem is not None:
        raise IncompleteAnswer(f"AWS {service} {operation} answered with {problem}: the connection was cut")


def _checked(client: C) -> C:
    client.meta.events.register("after-call", refuse_incomplete_answers)  # type: ignore[attr-defined]
    return client


@dataclass(frozen=True)
class Clients:
    """The three clients the deployer talks to; injected everywhere so tests can swap them."""

    s3: S3Client
    sns: SNSClient
    sqs: SQSClient


def resolve_region(region: str | None) -> str:
    found = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not found:
        raise ConfigError("no AWS region: set `region` in the config, --region, or AWS_REGION")
    return found


def _config() -> Config:
    return Config(
        # Our RetryPolicy is the only retry layer; botocore's would multiply attempts.
        retries={"total_max_attempts": 1},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        user_agent_extra=f"deployer/{__version__}",
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )


#: The endpoint prefixes of the services the deployer calls (S3, SNS, SQS, STS, Auto Scaling, ELBv2,
#: SSM, Secrets Manager, KMS, CloudWatch, EventBridge, IAM): `tests/unit/test_clients.py` checks
#: that every client factory here names one of them.
ENDPOINT_PREFIXES = frozenset(
    {
        "s3",
        "sns",
        "sqs",
        "sts",
        "autoscaling",
        "elasticloadbalancing",
        "ssm",
        "secretsmanager",
        "kms",
        "monitoring",
        "events",
        "iam",
    }
)


class _OurServicesLoader(Loader):
    """botocore's data loader, with its endpoint table cut to `ENDPOINT_PREFIXES`.

    The table (`endpoints.json`) lists every service of every partition: ~6.7 MiB of dicts per
    session, kept for the life of the process, of which a client reads its own service's entry
    only. Cut, an idle agent's RSS drops by ~5.5 MiB (docs/benchmarks.md, figure 4) and every
    CLI start parses less. The entries kept are botocore's own, unchanged, so each of our clients
    resolves exactly as before; a service missing from the cut would be resolved by botocore's
    fallback (`<prefix>.<region>.amazonaws.com`), which is why the prefixes are tested.
    """

    def load_data_with_path(self, name: str) -> tuple[Any, str]:
        data, path = super().load_data_with_path(name)  # cached per loader: trimmed once, in place
        if name == "endpoints":
            for partition in data.get("partitions", []):
                services = partition.get("services", {})
                for prefix in [prefix for prefix in services if prefix not in ENDPOINT_PREFIXES]:
                    del services[prefix]
        return data, path


def parse_timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, with a fast path for the ISO 8601 form S3's XML answers carry
    (`2026-12-07T21:00:00.000Z`): `datetime.fromisoformat`, ~20× faster than the dateutil parse
    botocore makes of every timestamp, which was most of the CPU a fleet read spends on its LIST
    pages (one LastModified per report, 10,000 in `deployer status`). Any other form, and any
    string fromisoformat refuses, goes to botocore's parser, which knows them all."""
    if isinstance(value, str) and len(value) >= 20 and value[10] == "T" and value[-1] == "Z":
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value)
    parsed: datetime = botocore_parse_timestamp(value)
    return parsed


def _botocore_session() -> botocore.session.Session:
    """A botocore session whose data loader is `_OurServicesLoader` (set up as botocore's own is)
    and whose answers' timestamps go through `parse_timestamp`."""
    core = botocore.session.get_session()
    search_path = core.get_config_variable("data_path")
    extra = (
        [os.path.expanduser(os.path.expandvars(path)) for path in search_path.split(os.pathsep)] if search_path else []
    )
    core.register_component("data_loader", _OurServicesLoader(extra_search_paths=extra))
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return core


#: One boto3 session per region for the whole process, and the lock its client creation takes
#: (a session is not safe to make clients from in two threads at once).
_SESSIONS: dict[tuple[str, str | None, str | None], boto3.session.Session] = {}
_SESSIONS_LOCK = threading.Lock()


def shared_session(region: str | None = None) -> boto3.session.Session:
    """The process's session for `region`. Every client made from it shares what botocore loads
    once per session (endpoint and partition data, service models): a session of its own per
    client cost an idle agent ~8 MB each (three more clients: +24 MB apart, +4 MB shared), and
    an agent makes STS, and often Auto Scaling, ELB or SSM clients beside S3, SNS and SQS."""
    name = resolve_region(region)
    # A session resolves credentials once: one whose environment names others (a process that
    # switches profile or keys) gets a session of its own.
    key = (name, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = boto3.session.Session(botocore_session=_botocore_session(), region_name=name)
        return _SESSIONS[key]


def _client(session: boto3.session.Session, service: str, endpoint_url: str | None, config: Config) -> Any:
    with _SESSIONS_LOCK:
        return _checked(session.client(service, endpoint_url=endpoint_url, config=config))  # type: ignore[call-overload]


def make_clients(
    region: str | None = None, endpoint_url: str | None = None, session: boto3.session.Session | None = None
) -> Clients:
    """Build clients. endpoint_url (or AWS_ENDPOINT_URL, which boto3 reads itself) points at the
    emulator; `session` carries other credentials (a role assumed in another account)."""
    session = session or shared_session(region)
    config = _config()
    return Clients(
        s3=_client(session, "s3", endpoint_url, config),
        sns=_client(session, "sns", endpoint_url, config),
        sqs=_client(session, "sqs", endpoint_url, config),
    )


def _service_client(service: str, region: str | None, endpoint_url: str | None) -> Any:
    """One client made like every other: the process's session, `_config()`, the incomplete-answer check."""
    return _client(shared_session(region), service, endpoint_url, _config())


def caller_userid(
    region: str | None = None, endpoint_url: str | None = None, policy: RetryPolicy = DEFAULT_POLICY
) -> str:
    """`sts:GetCallerIdentity`'s UserId: `<role id>:<instance id>` for an EC2 instance role session.

    GetCallerIdentity needs no IAM permission, so an instance can always learn what IAM's
    `${aws:userid}` is for it. https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html
    """
    return str(policy.call(sts_client(region, endpoint_url).get_caller_identity)["UserId"])


#: How long an assumed role's credentials last; botocore refreshes them before they expire.
#: https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRole.html (DurationSeconds, 900-43200)
ASSUMED_ROLE_SECONDS = 3600


def assumed_session(
    region: str,
    endpoint_url: str | None,
    role_arn: str,
    external_id: str | None,
    session_name: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> boto3.session.Session:
    """A session in `region` as `role_arn` (another account's CI role), its credentials assumed with
    `external_id` and refreshed before they expire, so a long rollout never runs out of them."""
    from botocore.credentials import RefreshableCredentials

    sts = sts_client(region, endpoint_url)
    params: dict[str, Any] = {
        "RoleArn": role_arn,
        "RoleSessionName": session_name[:64],
        "DurationSeconds": ASSUMED_ROLE_SECONDS,
    }
    if external_id:
        params["ExternalId"] = external_id

    def fetch() -> dict[str, str]:
        creds = policy.call(sts.assume_role, **params)["Credentials"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": creds["Expiration"].isoformat(),
        }

    credentials = RefreshableCredentials.create_from_metadata(fetch(), fetch, "sts-assume-role")
    core = _botocore_session()
    # botocore has no public setter for refreshable credentials (set_credentials makes static
    # ones that would expire mid-rollout); get_credentials() returns this attribute.
    core._credentials = credentials  # type: ignore[attr-defined]
    return boto3.session.Session(botocore_session=core, region_name=region)


def autoscaling_client(region: str | None = None, endpoint_url: str | None = None) -> AutoScalingClient:
    """Built like the others; only agents with a launch hook (and `--asg` readers) need it."""
    return cast("AutoScalingClient", _service_client("autoscaling", region, endpoint_url))


def elbv2_client(region: str | None = None, endpoint_url: str | None = None) -> ElasticLoadBalancingv2Client:
    """Only agents behind a load balancer (and a rollout driver keeping a target group healthy) need it."""
    return cast("ElasticLoadBalancingv2Client", _service_client("elbv2", region, endpoint_url))


def ssm_client(region: str | None = None, endpoint_url: str | None = None) -> SSMClient:
    """Only agents whose manifests name SSM parameters as secrets need it."""
    return cast("SSMClient", _service_client("ssm", region, endpoint_url))


def secretsmanager_client(region: str | None = None, endpoint_url: str | None = None) -> SecretsManagerClient:
    """Only agents whose manifests name Secrets Manager secrets need it."""
    return cast("SecretsManagerClient", _service_client("secretsmanager", region, endpoint_url))


def kms_client(region: str | None = None, endpoint_url: str | None = None) -> KMSClient:
    """Only publishers that sign with a KMS key need it (agents verify offline)."""
    return cast("KMSClient", _service_client("kms", region, endpoint_url))


def cloudwatch_client(region: str | None = None, endpoint_url: str | None = None) -> CloudWatchClient:
    """Only a rollout driver with `--alarm` and `status --metrics` need it."""
    return cast("CloudWatchClient", _service_client("cloudwatch", region, endpoint_url))


def events_client(region: str | None = None, endpoint_url: str | None = None) -> EventBridgeClient:
    """Only a CLI sending deploy events (`--event-bus`) and `init --events-target` need it."""
    return cast("EventBridgeClient", _service_client("events", region, endpoint_url))


def iam_client(region: str | None = None, endpoint_url: str | None = None) -> IAMClient:
    """Only `deployer doctor` needs it: IAM's policy simulator, read-only."""
    return cast("IAMClient", _service_client("iam", region, endpoint_url))


def sts_client(region: str | None = None, endpoint_url: str | None = None) -> STSClient:
    return cast("STSClient", _service_client("sts", region, endpoint_url))
