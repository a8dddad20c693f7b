"""Child for figure 4: where an agent's resident memory comes from, import by import (prints JSON)."""

from __future__ import annotations

import json
import os
import sys


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    steps = [("Python interpreter", rss_mib())]
    import click  # noqa: F401
    import yaml  # noqa: F401

    steps.append(("+ click, PyYAML", rss_mib()))
    import structlog  # noqa: F401

    steps.append(("+ structlog (it imports asyncio, among others)", rss_mib()))
    import boto3  # noqa: F401

    steps.append(("+ import boto3 / botocore", rss_mib()))
    from deployer.aws.clients import make_clients

    make_clients(os.environ.get("AWS_REGION", "us-east-1"), os.environ.get("AWS_ENDPOINT_URL"))
    steps.append(("+ the three clients (S3, SNS, SQS: models, endpoint rules, the endpoint table cut)", rss_mib()))
    import deployer.agent.loop
    import deployer.cli  # noqa: F401

    steps.append(("+ the deployer's own modules", rss_mib()))
    json.dump(steps, sys.stdout)


if __name__ == "__main__":
    main()
