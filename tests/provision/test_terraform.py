"""The Terraform module, for real: its policies are the CLI's, and terraform applies the example
against moto on 127.0.0.1, an agent converges on what it created, deploy events reach a queue
through the rules and the bucket notification it made, and destroy leaves nothing; it applies the
targets example in two regions and two accounts, and `publish --targets` publishes to both with
the fleet definition it outputs.

Terraform and the hashicorp/aws provider come from the machine (`terraform` on PATH, the provider
in a plugin directory, `DEPLOYER_TF_PLUGIN_DIR`, default /opt/tf-plugins); without them these
tests skip, in CI too: .ci/run installs nothing for them. Terraform never reaches the network:
`init -plugin-dir` installs only from the local directory, every proxy variable points at a
closed loopback port, the provider's endpoints are moto's, and it skips credential, account-id
and metadata lookups (nothing contacts 169.254.169.254).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from deployer.aws.clients import make_clients
from deployer.aws.events import fleet_pattern, instance_pattern
from deployer.local.emulator import Emulator
from deployer.protocol.events import FLEET_RULE, INSTANCE_RULE, EventType
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.names import Channel
from deployer.protocol.targets import MoveState, RecordState, Target, parse_fleet_definition, parse_record
from publisher.iam import Audience, Scope, policy_for
from tests.asg_fake import LifecycleFake, lifecycle_proxy
from tests.provision.conftest import REPO, SCRIPTS, run
from tests.support import REGION, AgentProcess, Fleet, InstanceRole, cli, make_tree, wait_until

TERRAFORM = REPO / "terraform"
PLUGIN_DIR_ENV = "DEPLOYER_TF_PLUGIN_DIR"
DEFAULT_PLUGIN_DIR = Path("/opt/tf-plugins")
#: Every AWS service the module's resources (and the provider's own lookups) call.
SERVICES = ("autoscaling", "ec2", "events", "iam", "s3", "sns", "sqs", "sts")
#: One of moto's built-in AMIs (listing them all costs seconds).
AMI = "ami-03cf127a"
#: init, validate, apply and destroy each start the provider; on 2 cores that is seconds apiece.
TERRAFORM_TIMEOUT_SECONDS = 180
#: moto's account, the targets example's target A's; target B is in another account and region
#: (moto's STS AssumeRole into a role ARN of an account hands out that account's credentials).
ACCOUNT = "123456789012"
OTHER_ACCOUNT, OTHER_REGION = "222222222222", "us-west-2"
#: The role provider aws.b assumes to manage target B (moto needs no such role to exist).
TERRAFORM_ROLE_ARN = f"arn:aws:iam::{OTHER_ACCOUNT}:role/terraform"
EXTERNAL_ID = "fleet-deployer-tf"
GITHUB_OIDC_PROVIDER_ARN = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"


def terraform_binary() -> str:
    found = shutil.which("terraform")
    if not found:
        pytest.skip("terraform is not installed (it comes with the machine image; .ci/run does not install it)")
    return found


def plugin_dir() -> Path:
    """The local provider mirror `terraform init -plugin-dir` installs hashicorp/aws from."""
    configured = os.environ.get(PLUGIN_DIR_ENV)
    path = Path(configured) if configured else DEFAULT_PLUGIN_DIR
    if not (path / "registry.terraform.io/hashicorp/aws").is_dir():
        pytest.skip(f"no hashicorp/aws provider mirror at {path} (set {PLUGIN_DIR_ENV} to one)")
    return path


def test_the_policy_templates_are_what_deployer_iam_policy_prints_now() -> None:
    """The module must grant exactly what the CLI prints: a changed policy without regenerated
    templates would leave every Terraform user on the old grants."""
    result = run(
        [str(SCRIPTS / "terraform-policies"), "--check"],
        timeout=120,
        cwd=REPO,
        env={**os.environ, "DEPLOYER_PYTHON": sys.executable},
    )
    assert result.returncode == 0, (
        "terraform/policies differs from `deployer iam-policy`: run scripts/terraform-policies\n"
        + result.stdout
        + result.stderr
    )


def test_the_terraform_files_are_formatted() -> None:
    result = run([terraform_binary(), "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)], env=quiet_env())
    assert result.returncode == 0, "run `terraform fmt -recursive terraform`\n" + result.stdout + result.stderr


def quiet_env(**extra: str) -> dict[str, str]:
    """No update check, no prompts, and no user CLI config (which could name network mirrors)."""
    return {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0", **extra}


class Terraform:
    """terraform in a throwaway copy of the example, its provider pointed at the emulator."""

    def __init__(self, binary: str, workdir: Path, env: dict[str, str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.env = env

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = run(
            [self.binary, *args, "-no-color"], timeout=TERRAFORM_TIMEOUT_SECONDS, cwd=self.workdir, env=self.env
        )
        assert result.returncode == 0, f"terraform {args[0]} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def outputs(self) -> dict[str, Any]:
        result = run([self.binary, "output", "-json"], cwd=self.workdir, env=self.env)
        assert result.returncode == 0, result.stderr
        return {name: value["value"] for name, value in json.loads(result.stdout).items()}


def emulator_provider(endpoint: str, alias: str | None = None, region: str | None = REGION) -> str:
    """An override file's provider block (merged into the example's of the same alias) that points
    it at moto; region None keeps the example's."""
    endpoints = "\n".join(f'    {service} = "{endpoint}"' for service in SERVICES)
    settings = "".join(f'  {name:<27} = "{value}"\n' for name, value in (("alias", alias), ("region", region)) if value)
    return f"""provider "aws" {{
{settings}  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  s3_use_path_style           = true
  endpoints {{
{endpoints}
  }}
}}
"""


def initialised(example: str, override: str, tmp_path: Path, closed_port: int) -> Terraform:
    """terraform/<example> in tmp_path (state and .terraform never land in the repository), with
    the files the modules read from the repository beside it (the policy templates and cloud-init)
    and the override file pointing its providers at the emulator, after `init`."""
    binary, plugins = terraform_binary(), plugin_dir()
    work = tmp_path / "tf"
    shutil.copytree(TERRAFORM, work / "terraform", ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    shutil.copytree(SCRIPTS / "cloud-init", work / "scripts/cloud-init")
    workdir = work / "terraform" / example
    (workdir / "emulator_override.tf").write_text(override)
    cli_config = tmp_path / "terraformrc"
    cli_config.write_text("")
    proxy = f"http://127.0.0.1:{closed_port}"
    env = quiet_env(
        TF_CLI_CONFIG_FILE=str(cli_config),
        TF_PLUGIN_CACHE_DIR="",
        HOME=str(tmp_path),
        AWS_EC2_METADATA_DISABLED="true",
        # Anything that is not the emulator (a registry, a checkpoint, a real AWS endpoint) fails at once.
        HTTP_PROXY=proxy,
        HTTPS_PROXY=proxy,
        NO_PROXY="127.0.0.1",
    )
    tf = Terraform(binary, workdir, env)
    tf("init", "-backend=false", f"-plugin-dir={plugins}")
    return tf


#: The emulator's gaps (terraform/README.md), set in every apply against it: the provider waits a
#: minute for a lifecycle header moto never sends; moto enforces the bucket policy's Denies without
#: their conditions, so every publish would be refused; a bucket with releases in it is deleted only
#: when forced.
EMULATOR_GAPS = {"bucket_lifecycle": False, "bucket_policy": False, "force_destroy": True}


@pytest.fixture
def terraform(aws_env: Emulator, tmp_path: Path, closed_port: int) -> Terraform:
    """terraform/example, initialised against the emulator."""
    return initialised("example", emulator_provider(aws_env.url), tmp_path, closed_port)


@pytest.fixture
def terraform_targets(aws_env: Emulator, tmp_path: Path, closed_port: int) -> Terraform:
    """terraform/example-targets, both of its providers (aws.a, aws.b) pointed at the emulator,
    each in the region its variables name."""
    override = "\n".join(emulator_provider(aws_env.url, alias, region=None) for alias in ("a", "b"))
    return initialised("example-targets", override, tmp_path, closed_port)


def default_subnet(endpoint: str) -> str:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    return str(subnets[0]["SubnetId"])


def launch_template(endpoint: str, template_id: str) -> tuple[dict[str, Any], bytes]:
    """The launch template's metadata options and its (decoded) user-data, as the emulator holds them."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    data = ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Latest"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    return dict(data["MetadataOptions"]), base64.b64decode(data["UserData"])


def agent_yml(user_data: bytes, scratch: Path) -> dict[str, Any]:
    """The agent config the cloud-init user-data writes, after cloud-init itself (when installed)
    accepted the document: a config Terraform re-encoded into invalid cloud-config would leave
    every instance without one."""
    cloud_init = shutil.which("cloud-init")
    if cloud_init:
        path = scratch / "user-data.yml"
        path.write_bytes(user_data)
        result = run([cloud_init, "schema", "--config-file", str(path)])
        assert result.returncode == 0, result.stdout + result.stderr
    cloud_config = yaml.safe_load(user_data)
    (content,) = [f["content"] for f in cloud_config["write_files"] if f["path"] == "/etc/deployer/agent.yml"]
    return dict(yaml.safe_load(content))


def attached_policy(iam: Any, role_name: str) -> dict[str, Any]:
    """The document of the one managed policy attached to the role, as the emulator holds it."""
    (attached,) = iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]
    version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
    return dict(iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"])


def policies_in_place(endpoint: str, out: dict[str, Any]) -> dict[str, Any]:
    """Each policy as the emulator holds it (the bucket policy, which the test cannot attach, as rendered)."""
    iam = boto3.client("iam", region_name=REGION, endpoint_url=endpoint)
    sns = boto3.client("sns", region_name=REGION, endpoint_url=endpoint)
    return {
        "ci": attached_policy(iam, "deployer-ci"),
        "instance": iam.get_role_policy(RoleName="deployer-prod-web", PolicyName="deployer-agent")["PolicyDocument"],
        "gc": iam.get_role_policy(RoleName="deployer-gc", PolicyName="deployer-gc")["PolicyDocument"],
        "topic": json.loads(sns.get_topic_attributes(TopicArn=out["topic_arn"])["Attributes"]["Policy"]),
        "bucket": json.loads(out["bucket_policy_json"]),
    }


def cli_policies(out: dict[str, Any], notify_topic_arn: str) -> dict[str, Any]:
    """What `deployer iam-policy` prints for the names Terraform chose."""
    scope = Scope(bucket=out["bucket_name"], topic_arn=out["topic_arn"], prefix=out["prefix"])
    return {
        # --stage prod --event-bus default --notify TOPIC: the base template and both options' templates.
        "ci": policy_for(
            Audience.CI, replace(scope, stage="prod", event_bus="default", notify_topics=(notify_topic_arn,))
        ),
        "instance": policy_for(
            Audience.INSTANCE,
            replace(
                scope,
                stage="prod",
                role="web",
                asg_name=out["web_autoscaling_group_name"],
                lifecycle=True,
                deregister=True,
                terminate=True,
            ),
        ),
        "gc": policy_for(Audience.GC, scope),
        "topic": policy_for(Audience.TOPIC, replace(scope, publishers=(out["ci_role_arn"],))),
        "bucket": policy_for(Audience.BUCKET, scope),
    }


def event_rules(endpoint: str) -> dict[str, Any]:
    """The default bus's rules: ARN, pattern, state and targets."""
    events = boto3.client("events", region_name=REGION, endpoint_url=endpoint)
    return {
        rule["Name"]: {
            "arn": rule["Arn"],
            "pattern": json.loads(rule["EventPattern"]),
            "state": rule["State"],
            "targets": [(t["Id"], t["Arn"]) for t in events.list_targets_by_rule(Rule=rule["Name"])["Targets"]],
        }
        for rule in events.list_rules(EventBusName="default")["Rules"]
    }


def drain(endpoint: str, queue_url: str) -> list[dict[str, Any]]:
    """Every message in the queue (moto delivers EventBridge targets before PutEvents returns)."""
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=endpoint)
    bodies = []
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


def leftovers(endpoint: str) -> dict[str, list[Any]]:
    """Everything of the kinds the module creates (and the agent registers) still in the emulator."""
    client = {name: boto3.client(name, region_name=REGION, endpoint_url=endpoint) for name in SERVICES}  # type: ignore[call-overload]
    return {
        "buckets": client["s3"].list_buckets()["Buckets"],
        "topics": client["sns"].list_topics()["Topics"],
        "subscriptions": client["sns"].list_subscriptions()["Subscriptions"],
        "queues": client["sqs"].list_queues().get("QueueUrls", []),
        "roles": client["iam"].list_roles()["Roles"],
        "policies": client["iam"].list_policies(Scope="Local")["Policies"],
        "instance_profiles": client["iam"].list_instance_profiles()["InstanceProfiles"],
        "launch_templates": client["ec2"].describe_launch_templates()["LaunchTemplates"],
        "groups": client["autoscaling"].describe_auto_scaling_groups()["AutoScalingGroups"],
        "rules": client["events"].list_rules()["Rules"],
    }


@pytest.fixture
def hook_fake(aws_env: Emulator) -> Iterator[LifecycleFake]:
    """moto lacks CompleteLifecycleAction: the agent talks to moto through a proxy that answers it."""
    with lifecycle_proxy(aws_env.url) as fake:
        yield fake


@pytest.mark.e2e
def test_terraform_applies_the_example_an_agent_converges_on_it_and_destroy_leaves_nothing(
    terraform: Terraform, aws_env: Emulator, hook_fake: LifecycleFake, tmp_path: Path, fake_imds: str
) -> None:
    terraform("validate")
    # What deploy events go to, which the module does not own: a chat integration's topic the CI
    # role may tell, and the queue the rules deliver to. The test makes them: the provider waits
    # about 25 s for a queue's attributes, and as long again for a queue policy, to read back the
    # same several times in a row, and moto evaluates no queue policy anyway.
    sns = boto3.client("sns", region_name=REGION, endpoint_url=aws_env.url)
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=aws_env.url)
    chat_topic_arn = sns.create_topic(Name="deploy-chat")["TopicArn"]
    events_queue = sqs.create_queue(QueueName="deploy-events")["QueueUrl"]
    events_queue_arn = sqs.get_queue_attributes(QueueUrl=events_queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    variables = {
        "region": REGION,
        "bucket_name": "tf-deploys",
        "image_id": AMI,
        "subnet_ids": [default_subnet(aws_env.url)],
        "desired_capacity": 1,
        "github_repository": "acme/api",
        "github_oidc_provider_arn": GITHUB_OIDC_PROVIDER_ARN,
        "gc_role": True,
        "deregister_on_shutdown": True,
        "event_bus": "default",
        "events_target_arn": events_queue_arn,
        "notify_topic_arns": [chat_topic_arn],
        **EMULATOR_GAPS,
    }
    (terraform.workdir / "emulator.auto.tfvars.json").write_text(json.dumps(variables))
    terraform("apply", "-auto-approve")
    out = terraform.outputs()
    assert out["ci_role_arn"].endswith(":role/deployer-ci")
    assert out["gc_role_arn"].endswith(":role/deployer-gc")
    # The templates, rendered with Terraform's names, are the CLI's policies for those names.
    assert policies_in_place(aws_env.url, out) == cli_policies(out, chat_topic_arn)

    # Deploy events: the rules `deployer init --events-target` puts (deployer/aws/events.py), on
    # the default bus, to the queue. moto's GetBucketNotificationConfiguration leaves out
    # EventBridgeConfiguration (terraform/README.md), so the bucket's notification is shown below
    # by an event object's delivery instead.
    events_prefix = Layout(out["prefix"]).events_prefix()
    assert event_rules(aws_env.url) == {
        FLEET_RULE: {
            "arn": out["fleet_events_rule_arn"],
            "pattern": fleet_pattern(),
            "state": "ENABLED",
            "targets": [("deployer", events_queue_arn)],
        },
        INSTANCE_RULE: {
            "arn": out["instance_events_rule_arn"],
            "pattern": instance_pattern(out["bucket_name"], events_prefix),
            "state": "ENABLED",
            "targets": [("deployer", events_queue_arn)],
        },
    }

    # The instance's config is the one its launch template carries, IMDSv2 only.
    metadata, user_data = launch_template(aws_env.url, out["web_launch_template_id"])
    assert metadata["HttpTokens"] == "required"
    config = agent_yml(user_data, tmp_path)
    assert config == out["web_agent_config"]
    assert config["lifecycle_hook_name"] == "deployer-boot"
    group = boto3.client("autoscaling", region_name=REGION, endpoint_url=aws_env.url).describe_auto_scaling_groups(
        AutoScalingGroupNames=[out["web_autoscaling_group_name"]]
    )["AutoScalingGroups"][0]
    (instance_id,) = [i["InstanceId"] for i in group["Instances"]]

    # CI publishes with the environment the module outputs: one release before the instance boots
    # (boot replay), one while its agent runs (the topic Terraform made delivers it).
    ci_env = out["cli_environment"]
    assert (ci_env["DEPLOYER_EVENT_BUS"], ci_env["DEPLOYER_NOTIFY"]) == ("default", chat_topic_arn)

    def publish(component: str, text: str) -> None:
        build = make_tree(tmp_path / f"build-{component}", {"index.html": text})
        args = ["--stage", "prod", "--role", "web", "--component", component, "--artifact", str(build)]
        result = cli("publish", *args, env=ci_env)
        assert result.returncode == 0, result.stderr
        # Both sinks cli_environment names took the event (a refused one is only logged).
        assert "event_not_delivered" not in result.stderr, result.stderr

    publish("provision", "provisioned")
    fleet = Fleet(
        clients=make_clients(REGION, aws_env.url),
        bucket=out["bucket_name"],
        topic_arn=out["topic_arn"],
        endpoint_url=aws_env.url,
        layout=Layout(out["prefix"]),
    )
    role = InstanceRole(aws_env.url, out["web_instance_role_arn"], out["web_instance_role_id"])
    agent = AgentProcess(
        fleet,
        tmp_path / "instance",
        instance_id,
        **config,
        endpoint_url=hook_fake.url,
        poll_wait_seconds=1,
        metadata_endpoint=fake_imds,  # the terminate hook's watch asks IMDS; never the real address
    )
    agent.role_id = role.role_id
    agent.start(role.session_env(instance_id))
    try:
        wait_until(lambda: agent.on_seq(1, "provision") or not agent.alive(), "boot replay of provision")
        assert agent.served("provision") == "provisioned"
        # Entered service through the hook Terraform put on the group.
        wait_until(lambda: bool(hook_fake.completed), "the launch hook to be completed")
        assert hook_fake.completed[0]["AutoScalingGroupName"] == out["web_autoscaling_group_name"]
        assert hook_fake.completed[0]["LifecycleActionResult"] == "CONTINUE"
        publish("api", "hello from terraform")
        wait_until(lambda: agent.on_seq(1, "api"), "the running agent to apply api seq 1")
        assert agent.served("api") == "hello from terraform"
    finally:
        code = agent.stop()
    # deregister_on_shutdown: the agent took its queues, subscription and report with it.
    assert code == 0, agent.log_path.read_text()
    left = leftovers(aws_env.url)
    assert (left["queues"], left["subscriptions"]) == ([events_queue], []), left

    # An instance event object, at the key an agent writes it to (only a failed or rejected deploy
    # makes one), reaches the queue through the bucket's notification and the instance rule, as
    # both publishes' events did through the fleet rule; nothing else did.
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=aws_env.url)
    who = ReportKey("prod", "web", instance_id, role.role_id)
    event_key = Layout(out["prefix"]).event_key(EventType.INSTANCE_DEPLOY_FAILED.slug, who, "d-terraform")
    s3.put_object(Bucket=out["bucket_name"], Key=event_key, Body=b"{}")
    delivered = [
        (e["source"], e["detail-type"], e["detail"].get("component") or e["detail"]["object"]["key"])
        for e in drain(aws_env.url, events_queue)
    ]
    assert sorted(delivered) == [
        ("aws.s3", "Object Created", event_key),
        ("deployer", EventType.DEPLOY_PUBLISHED.value, "api"),
        ("deployer", EventType.DEPLOY_PUBLISHED.value, "provision"),
    ]

    # The state is the one apply just wrote (the agent removed only its own registrations).
    terraform("destroy", "-auto-approve", "-refresh=false")
    sns.delete_topic(TopicArn=chat_topic_arn)
    sqs.delete_queue(QueueUrl=events_queue)
    left = leftovers(aws_env.url)
    assert left == {kind: [] for kind in left}


def as_other_account(endpoint: str) -> boto3.session.Session:
    """Credentials of OTHER_ACCOUNT, as provider aws.b gets them (moto's AssumeRole)."""
    sts = boto3.client("sts", region_name=REGION, endpoint_url=endpoint)
    creds = sts.assume_role(RoleArn=TERRAFORM_ROLE_ARN, RoleSessionName="test")["Credentials"]
    return boto3.session.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        region_name=OTHER_REGION,
    )


@pytest.mark.e2e
@pytest.mark.moto_only("a second account through STS AssumeRole, and a second region")
def test_terraform_applies_the_targets_example_in_two_regions_and_accounts_and_its_fleet_yml_publishes_to_both(
    terraform_targets: Terraform, aws_env: Emulator, tmp_path: Path
) -> None:
    terraform_targets("validate")
    variables = {
        "target_a": {"name": "east", "region": REGION, "bucket_name": "tf-deploys-east"},
        "target_b": {
            "name": "west",
            "region": OTHER_REGION,
            "bucket_name": "tf-deploys-west",
            # Provider aws.b manages target B as a role of the other account.
            "terraform_role_arn": TERRAFORM_ROLE_ARN,
        },
        "external_id": EXTERNAL_ID,
        "github_repository": "acme/api",
        "github_oidc_provider_arn": GITHUB_OIDC_PROVIDER_ARN,
        **EMULATOR_GAPS,
    }
    (terraform_targets.workdir / "emulator.auto.tfvars.json").write_text(json.dumps(variables))
    terraform_targets("apply", "-auto-approve")
    out = terraform_targets.outputs()
    source_role, target_role = out["source_ci_role_arn"], out["target_ci_role_arn"]
    assert source_role == f"arn:aws:iam::{ACCOUNT}:role/deployer-ci"
    assert target_role == f"arn:aws:iam::{OTHER_ACCOUNT}:role/deployer-ci-west"

    # The fleet definition is `deployer publish --targets`' own format: A with the CLI's own
    # credentials, B (in the other account, its other region) through its CI role.
    a, b = out["target_a"], out["target_b"]
    assert parse_fleet_definition(out["fleet_yml"]) == (
        Target("east", REGION, a["bucket_name"], a["topic_arn"], a["prefix"]),
        Target("west", OTHER_REGION, b["bucket_name"], b["topic_arn"], b["prefix"], target_role, EXTERNAL_ID),
    )
    assert b["topic_arn"] == f"arn:aws:sns:{OTHER_REGION}:{OTHER_ACCOUNT}:deployer-west"

    # The policies in place are what `deployer iam-policy` prints for these names: the source CI
    # role's with --assume-role, target B's CI role's for its own account and its trust policy, and
    # each topic's, admitting the CI role that publishes there.
    other = as_other_account(aws_env.url)
    iam_a = boto3.client("iam", region_name=REGION, endpoint_url=aws_env.url)
    iam_b = other.client("iam", endpoint_url=aws_env.url)
    sns_a = boto3.client("sns", region_name=REGION, endpoint_url=aws_env.url)
    sns_b = other.client("sns", endpoint_url=aws_env.url)
    in_place = {
        "source ci": attached_policy(iam_a, "deployer-ci"),
        "target ci": attached_policy(iam_b, "deployer-ci-west"),
        "target trust": iam_b.get_role(RoleName="deployer-ci-west")["Role"]["AssumeRolePolicyDocument"],
        "topic a": json.loads(sns_a.get_topic_attributes(TopicArn=a["topic_arn"])["Attributes"]["Policy"]),
        "topic b": json.loads(sns_b.get_topic_attributes(TopicArn=b["topic_arn"])["Attributes"]["Policy"]),
    }
    scope_a = Scope(bucket=a["bucket_name"], topic_arn=a["topic_arn"], prefix=a["prefix"], stage="prod")
    scope_b = Scope(bucket=b["bucket_name"], topic_arn=b["topic_arn"], prefix=b["prefix"], stage="prod")
    assert in_place == {
        "source ci": policy_for(Audience.CI, replace(scope_a, assume_roles=(target_role,))),
        "target ci": policy_for(Audience.CI, scope_b),
        "target trust": policy_for(
            Audience.TARGET_TRUST, replace(scope_b, publishers=(source_role,), external_id=EXTERNAL_ID)
        ),
        "topic a": policy_for(Audience.TOPIC, replace(scope_a, publishers=(source_role,))),
        "topic b": policy_for(Audience.TOPIC, replace(scope_b, publishers=(target_role,))),
    }
    assert json.loads(out["target_trust_policy_json"]) == in_place["target trust"]

    # `deployer publish --targets` with the output as it is: target B through its CI role and the
    # external id, and both pointers move (no instance is expected: --wait has nothing to wait for).
    fleet_yml = tmp_path / "fleet.yml"
    fleet_yml.write_text(out["fleet_yml"])
    build = make_tree(tmp_path / "build", {"index.html": "everywhere"})
    channel = Channel("prod", "web", "api")
    published = cli(
        "publish", "--targets", str(fleet_yml), "--stage", channel.stage, "--role", channel.role,
        "--component", channel.component, "--artifact", str(build), "--wait",
    )  # fmt: skip
    assert published.returncode == 0, published.stdout + published.stderr
    s3_a = boto3.client("s3", region_name=REGION, endpoint_url=aws_env.url)
    s3_b = other.client("s3", endpoint_url=aws_env.url)
    for s3, target in ((s3_a, a), (s3_b, b)):
        s3.head_object(Bucket=target["bucket_name"], Key=Layout(target["prefix"]).pointer_key(channel))
    (record_key,) = [
        o["Key"]
        for o in s3_a.list_objects_v2(
            Bucket=a["bucket_name"], Prefix=Layout(a["prefix"]).targets_records_prefix(channel)
        )["Contents"]
    ]
    record = parse_record(s3_a.get_object(Bucket=a["bucket_name"], Key=record_key)["Body"].read())
    assert record.state == RecordState.DONE
    assert {name: (move.seq, move.state) for name, move in record.moves.items()} == {
        "east": (1, MoveState.PASSED),
        "west": (1, MoveState.PASSED),
    }
    # No destroy: with two provider configurations each plan costs about 10 s on 2 cores, the
    # emulator is reset before the next test anyway, and the example above shows the same module
    # destroyed to nothing.
