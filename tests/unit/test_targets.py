"""The fleet definition and the record of a publish across targets: strict, and in order."""

from __future__ import annotations

import json

import pytest
import yaml

from deployer.protocol.errors import ConfigError, InvalidMessage
from deployer.protocol.targets import (
    Move,
    MoveState,
    Record,
    RecordState,
    Target,
    parse_fleet_definition,
    parse_record,
    parse_target_option,
    waves_of,
)

EU = "{name: eu, region: eu-west-1, bucket: deploys-eu, topic: 'arn:aws:sns:eu-west-1:111111111111:deployer'}"
US = (
    "{name: us, region: us-east-1, bucket: deploys-us, topic: 'arn:aws:sns:us-east-1:222222222222:deployer', "
    "role: 'arn:aws:iam::222222222222:role/deployer-ci', external_id: fleet-1}"
)


def definition(*targets: str) -> str:
    return "targets:\n" + "".join(f"  - {t}\n" for t in targets)


def test_a_fleet_definition_lists_its_targets_in_order_and_the_options_say_the_same() -> None:
    eu, us = parse_fleet_definition(definition(EU, US))
    assert (eu.name, eu.region, eu.prefix, eu.role_arn) == ("eu", "eu-west-1", "deployer", None)
    assert (us.role_arn, us.external_id) == ("arn:aws:iam::222222222222:role/deployer-ci", "fleet-1")
    spec = "name=us,region=us-east-1,bucket=deploys-us,topic=arn:aws:sns:us-east-1:222222222222:deployer,role=arn:aws:iam::222222222222:role/deployer-ci,external_id=fleet-1"
    assert parse_target_option(spec) == us
    assert parse_fleet_definition(yaml.safe_dump({"targets": [eu.to_dict(), us.to_dict()]})) == (eu, us)


@pytest.mark.parametrize(
    ("targets", "error"),
    [
        ((EU.replace("eu-west-1, bucket", "mars-1, bucket"),), r"targets\[0\]\.region 'mars-1' is not an AWS region"),
        (
            (EU.replace("region: eu-west-1", "region: us-east-1"),),
            r"targets\[0\]\.topic .* is not in the target's region",
        ),
        (
            (US.replace("role: 'arn:aws:iam::222222222222", "role: 'arn:aws:iam::333333333333"),),
            "role is in account 333333333333, its topic in 222222222222",
        ),
        ((EU.replace("}", ", external_id: x1}"),), "external_id needs a role"),
        ((EU.replace("}", ", colour: red}"),), r"targets\[0\] has unknown key\(s\): colour"),
        ((EU, EU), "target names must differ: eu"),
        ((EU, EU.replace("name: eu", "name: eu2")), "same bucket and prefix"),
        ((EU.replace(", bucket: deploys-eu", ""),), r"targets\[0\] needs bucket"),
    ],
)
def test_a_bad_fleet_definition_is_refused_naming_the_target_and_the_key(targets: tuple[str, ...], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_fleet_definition(definition(*targets))


def test_targets_are_waves_in_order_unless_they_share_a_wave_number() -> None:
    a, b, c = (Target(n, "eu-west-1", f"b-{n}", "arn:aws:sns:eu-west-1:111111111111:t") for n in "abc")
    assert waves_of([a, b, c]) == [(a,), (b,), (c,)]
    grouped = [
        Target("a", "eu-west-1", "b-a", a.topic_arn, wave=0),
        Target("b", "eu-west-1", "b-b", a.topic_arn, wave=1),
        Target("c", "eu-west-1", "b-c", a.topic_arn, wave=1),
    ]
    assert [[t.name for t in w] for w in waves_of(grouped)] == [["a"], ["b", "c"]]


def test_a_record_round_trips_and_a_move_for_an_unknown_target_is_refused() -> None:
    targets = parse_fleet_definition(definition(EU, US))
    record = Record("20261207T000000Z-0a1b2c3d", "prod/web/api", "rel-2", targets).moved(
        targets[0], Move(7, "d-7", "rel-1", MoveState.PASSED)
    )
    assert parse_record(record.to_json()) == record
    doc = json.loads(record.to_json())
    doc["moves"]["mars"] = doc["moves"]["eu"]
    with pytest.raises(InvalidMessage, match=r"moves\.mars is not a move of a listed target"):
        parse_record(json.dumps(doc))
    doc = json.loads(record.to_json())
    doc["state"] = "exploded"
    with pytest.raises(InvalidMessage, match="exploded"):
        parse_record(json.dumps(doc))
    assert RecordState.ROLLING.value == "rolling"
