"""The process's boto3 sessions: one per region, with botocore's endpoint table cut to our services."""

from __future__ import annotations

import inspect
import re

import botocore.session
import pytest

from deployer.aws import clients
from deployer.aws.clients import ENDPOINT_PREFIXES, _botocore_session

#: Partitions and regions whose endpoint rules differ (global STS and IAM, S3's us-east-1, China, GovCloud).
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2", "cn-north-1", "us-gov-west-1"]


def _factory_services() -> set[str]:
    """Every service a client factory in deployer.aws.clients builds (`<service>_client`, and make_clients)."""
    services = {"s3", "sns", "sqs"}  # make_clients
    for name, _ in inspect.getmembers(clients, inspect.isfunction):
        if name.endswith("_client") and not name.startswith("_"):
            services.add(name.removesuffix("_client"))
    return services


def test_every_service_the_deployer_builds_a_client_for_keeps_its_endpoints() -> None:
    core = botocore.session.get_session()
    prefixes = {core.get_service_model(service).endpoint_prefix for service in _factory_services()}
    assert prefixes <= ENDPOINT_PREFIXES, prefixes - ENDPOINT_PREFIXES


@pytest.mark.parametrize("region", REGIONS)
def test_our_services_resolve_exactly_as_with_botocores_whole_endpoint_table(region: str) -> None:
    # botocore's own resolver over each table (a private component: there is no public handle on it).
    full = botocore.session.get_session()._get_internal_component("endpoint_resolver")  # type: ignore[attr-defined]
    cut = _botocore_session()._get_internal_component("endpoint_resolver")  # type: ignore[attr-defined]
    for prefix in sorted(ENDPOINT_PREFIXES):
        for fips in (False, True):
            assert cut.construct_endpoint(prefix, region, use_fips_endpoint=fips) == full.construct_endpoint(
                prefix, region, use_fips_endpoint=fips
            ), (prefix, region, fips)


def test_the_cut_table_keeps_no_other_service() -> None:
    loader = _botocore_session().get_component("data_loader")
    kept = {prefix for partition in loader.load_data("endpoints")["partitions"] for prefix in partition["services"]}
    assert kept <= ENDPOINT_PREFIXES
    assert {"s3", "sqs", "sns"} <= kept


@pytest.mark.parametrize(
    "value",
    [
        "2026-12-07T21:00:00.000Z",
        "2026-12-07T21:00:00Z",
        "2026-12-07T21:00:00.123456Z",
        "2026-12-07T21:00:00+01:00",
        "Mon, 07 Dec 2026 21:00:00 GMT",
        1796677577,
        "1796677577",
        "2026-13-07T21:00:00.000Z",  # no such month: botocore's parser says so, as before
    ],
)
def test_timestamps_parse_as_botocore_parses_them(value: str | int) -> None:
    from botocore.utils import parse_timestamp as botocores

    from deployer.aws.clients import parse_timestamp

    try:
        expected = botocores(value)  # type: ignore[arg-type]  # epoch numbers too (its docstring), not in the stubs
    except ValueError as refused:
        with pytest.raises(ValueError, match=re.escape(str(refused))):
            parse_timestamp(value)
        return
    assert parse_timestamp(value) == expected
