"""Test seam: the suite's emulator may be an external LocalStack instead of the embedded moto.

`scripts/localstack run -- CMD` starts LocalStack's community core on 127.0.0.1 (one instance per
pytest-xdist worker: bucket names are global across accounts there, as on AWS, so two workers
cannot share one) and sets DEPLOYER_TEST_EMULATOR=localstack and DEPLOYER_TEST_ENDPOINT (the
instances' URLs, space-separated). The session `emulator` fixture then returns a `LocalStack`,
which has the `url` and `reset()` of `deployer.local.emulator.Emulator`.

What LocalStack (community core 2026.3.0, services s3, sqs, sns, kms, sts, iam, cloudwatch)
lacks, seen on it, so that tests needing it are marked `moto_only` and skipped there:

- Auto Scaling is not in the community edition: every call (CreateLaunchConfiguration,
  DescribeAutoScalingGroups, CompleteLifecycleAction, ...) answers 501 InternalFailure, so no
  groups or instances (`make_asg`) and no lifecycle hooks (tests/asg_fake.py answers those
  on top of moto's groups);
- moto's API: GET /moto-api/ answers 404 and POST /moto-api/reset answers 200 but resets
  nothing; nor has community core a reset of its own (no /_localstack/state/reset), so
  `reset()` below deletes what the tests create;
- IAM is stored but never enforced, nor is a bucket policy (moto enforces its Denies; neither
  enforces queue policies); roles, AssumeRole and GetCallerIdentity work as on moto: a
  session's `aws:userid` is `<role id>:<session name>`.

Where the two answer the same call differently, LocalStack is the closer to AWS as far as seen:
Subscribe again with other attributes fails with InvalidParameter (moto overwrites them),
CreateQueue of an existing name with other tags keeps the first tags (moto re-tags), a
presigned URL with a wrong signature is refused with 403 SignatureDoesNotMatch (moto serves
it), SNS delivers to SQS after Publish returns (moto before), bucket names shorter than 3
characters are refused. It checks presigned URLs of access keys it does not know against the
secret "test", hence the suite's test/test credentials.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import boto3
import pytest
from botocore.config import Config

#: DEPLOYER_TEST_EMULATOR's value that selects LocalStack (anything else, or unset, is moto).
LOCALSTACK = "localstack"
#: Every region the suite creates resources in: the tests' own and the fake IMDS's.
REGIONS = ("us-east-1", "eu-west-1")
MOTO_ONLY = "moto_only"


def selected() -> str:
    """Which emulator the suite runs against: "moto" (the default) or "localstack"."""
    return os.environ.get("DEPLOYER_TEST_EMULATOR", "") or "moto"


class LocalStack:
    """An already running LocalStack on loopback, reset by deleting what the tests create.

    Deletes every bucket (its objects, versions and multipart uploads first), IAM role,
    topic, subscription, queue and alarm in `REGIONS`; KMS keys are left (each test makes its
    own, and scheduling their deletion would only take time).
    """

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")
        self._clients: dict[tuple[str, str], Any] = {}
        try:
            with urllib.request.urlopen(f"{self._url}/_localstack/health", timeout=5) as answer:
                health = json.load(answer)
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as e:
            raise RuntimeError(f"LocalStack does not answer on {self._url}: {e}") from e
        off = [name for name in ("s3", "sqs", "sns", "kms", "sts") if health["services"].get(name) == "disabled"]
        if off:
            raise RuntimeError(f"LocalStack on {self._url} runs without {', '.join(off)}")

    @classmethod
    def from_environment(cls) -> LocalStack:
        """The instance DEPLOYER_TEST_ENDPOINT gives this process: the n-th URL for xdist worker gw<n>."""
        urls = os.environ.get("DEPLOYER_TEST_ENDPOINT", "").split()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        index = int(worker.removeprefix("gw") or 0)
        if index >= len(urls):
            raise RuntimeError(
                f"DEPLOYER_TEST_ENDPOINT has {len(urls)} LocalStack URL(s) and xdist worker {worker} needs its "
                "own (workers cannot share one: bucket names are global); run under `scripts/localstack run "
                "--instances N` with N at least the number of workers"
            )
        return cls(urls[index])

    @property
    def url(self) -> str:
        return self._url

    def reset(self) -> None:
        self._empty_s3()
        self._empty_iam()
        for region in REGIONS:
            self._empty_region(region)

    def _client(self, service: str, region: str = REGIONS[0]) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = boto3.client(
                service,  # type: ignore[call-overload]
                region_name=region,
                endpoint_url=self._url,
                aws_access_key_id="test",
                aws_secret_access_key="test",
                config=Config(retries={"max_attempts": 2}),
            )
        return self._clients[key]

    def _empty_s3(self) -> None:
        s3 = self._client("s3")
        for bucket in s3.list_buckets()["Buckets"]:
            name = bucket["Name"]
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
                doomed = [
                    {"Key": item["Key"], "VersionId": item["VersionId"]}
                    for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
                ]
                if doomed:
                    s3.delete_objects(Bucket=name, Delete={"Objects": doomed, "Quiet": True})
            for upload in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
                s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
            s3.delete_bucket(Bucket=name)

    def _empty_iam(self) -> None:
        iam = self._client("iam")
        for page in iam.get_paginator("list_roles").paginate():
            for role in page["Roles"]:
                name = role["RoleName"]
                for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
                    iam.delete_role_policy(RoleName=name, PolicyName=policy)
                for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
                    iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
                for profile in iam.list_instance_profiles_for_role(RoleName=name)["InstanceProfiles"]:
                    iam.remove_role_from_instance_profile(
                        InstanceProfileName=profile["InstanceProfileName"], RoleName=name
                    )
                iam.delete_role(RoleName=name)

    def _empty_region(self, region: str) -> None:
        sns = self._client("sns", region)
        for page in sns.get_paginator("list_topics").paginate():
            for topic in page.get("Topics", []):
                sns.delete_topic(TopicArn=topic["TopicArn"])
        for page in sns.get_paginator("list_subscriptions").paginate():
            for subscription in page.get("Subscriptions", []):
                sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
        sqs = self._client("sqs", region)
        for page in sqs.get_paginator("list_queues").paginate():
            for url in page.get("QueueUrls", []):
                sqs.delete_queue(QueueUrl=url)
        cloudwatch = self._client("cloudwatch", region)
        for page in cloudwatch.get_paginator("describe_alarms").paginate():
            alarms = [alarm["AlarmName"] for alarm in page.get("MetricAlarms", [])]
            if alarms:
                cloudwatch.delete_alarms(AlarmNames=alarms)


def skip_moto_only(items: list[pytest.Item]) -> None:
    """Under LocalStack, skip every test marked `moto_only`, with the mark's reason."""
    if selected() != LOCALSTACK:
        return
    for item in items:
        mark = item.get_closest_marker(MOTO_ONLY)
        if mark is not None:
            reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "needs moto")
            item.add_marker(pytest.mark.skip(reason=f"moto only: {reason}"))
