from __future__ import annotations

from pathlib import Path

import pytest

from deployer.agent.config import config_from_dict, load_config
from deployer.protocol.errors import ConfigError
from deployer.protocol.names import Channel

TOPIC = "arn:aws:sns:us-east-1:123456789012:deployer"
BASE = {"stage": "prod", "role": "web", "components": ["provision", "api"], "bucket": "my-bucket", "topic_arn": TOPIC}


def test_a_minimal_config_gets_production_defaults() -> None:
    config = config_from_dict(dict(BASE))
    assert config.poll_wait_seconds == 20
    assert config.reconcile_interval_seconds == 300
    assert config.metadata_endpoint == "http://169.254.169.254"
    assert config.channels == (Channel("prod", "web", "provision"), Channel("prod", "web", "api"))
    assert config.queue_name("i-0abc") == "deployer--prod--web--i-0abc"


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text(
        "stage: prod\nrole: web\ncomponents: api\nbucket: my-bucket\ntopic_arn: " + TOPIC + "\nstate_dir: /tmp/s\n"
    )
    config = load_config(path)
    assert config.components == ("api",)
    assert config.state_dir == Path("/tmp/s")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"stage": "Prod"}, "stage 'Prod' is not a valid name"),
        ({"components": []}, "at least one component"),
        ({"components": ["api", "api"]}, "lists a component twice"),
        ({"bucket": "Bad_Bucket"}, "not a valid S3 bucket name"),
        ({"topic_arn": "deployer"}, "is not an SNS topic ARN"),
        ({"poll_wait_seconds": 25}, "must be 0..20 (SQS limit)"),
        ({"visibility_timeout_seconds": 10}, "must be 30..43200"),
        ({"max_receive_count": 0}, "must be 1..1000"),
        ({"reconcile_interval_seconds": 0}, "must be positive"),
        ({"state_dir": "relative"}, "must be absolute paths"),
        ({"poll_wait_seconds": "20"}, "poll_wait_seconds must be an integer"),
        ({"colour": "blue"}, "unknown key(s): colour"),
    ],
)
def test_a_bad_config_is_refused_with_the_value_and_the_limit(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, **changes})
    assert expected in str(info.value)


def test_a_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError, match="missing required key"):
        config_from_dict({"stage": "prod"})


def test_an_over_long_queue_name_is_refused() -> None:
    config = config_from_dict({**BASE, "queue_prefix": "q" * 55})
    with pytest.raises(ConfigError, match="longer than SQS's 80 characters"):
        config.queue_name("i-0123456789abcdef0")


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yml")
