"""Publishing against the emulator over HTTP: objects, pointer, history, fan-out, races, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from deployer.aws.checksum import UPLOAD_PART_BYTES
from deployer.aws.s3 import checksums_match, read_pointer
from deployer.protocol.deploy import parse_deploy
from deployer.protocol.errors import ConfigError, PublishError, ReleaseConflict
from deployer.protocol.manifest import Manifest, SyncStrategy, parse_manifest
from deployer.protocol.names import Channel
from publisher.infra import init_resources
from publisher.pack import file_artifact, pack_directory, sniff
from publisher.publish import Publisher
from tests.support import BUCKET, TOPIC, Fleet, add_file, make_tree, tar_bytes, write_release

API = Channel("prod", "web", "api")
SYMLINK = Manifest(sync_strategy=SyncStrategy.SYMLINK)


def publisher(fleet: Fleet) -> Publisher:
    return Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)


def subscribe_queue(fleet: Fleet, name: str = "probe") -> str:
    sqs, sns = fleet.clients.sqs, fleet.clients.sns
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=fleet.topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
    return url


def test_init_is_idempotent(fleet: Fleet) -> None:
    again = init_resources(fleet.clients, BUCKET, TOPIC)
    assert not again.bucket_created
    assert again.topic_arn == fleet.topic_arn


def test_publish_writes_release_history_pointer_and_notifies_in_one_document(fleet: Fleet, tmp_path: Path) -> None:
    queue = subscribe_queue(fleet)
    artifact, digest = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    result = publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r1", origin={"github_run_id": "9"})
    deploy = result.deploy
    assert deploy.seq == 1
    s3 = fleet.clients.s3
    manifest = parse_manifest(s3.get_object(Bucket=BUCKET, Key=deploy.manifest_key)["Body"].read())
    assert manifest.checksum == digest
    assert manifest.src == f"s3://{BUCKET}/deployer/artifacts/sha256/{digest}"  # named by its content
    assert manifest.dest == "/opt/api/current"
    assert manifest.sync_strategy is SyncStrategy.SYMLINK
    pointer = read_pointer(s3, BUCKET, fleet.layout, API)
    assert pointer is not None
    assert pointer.deploy == deploy
    history = s3.get_object(Bucket=BUCKET, Key=fleet.layout.history_key(API, 1))["Body"].read()
    assert parse_deploy(history) == deploy
    [message] = fleet.clients.sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)["Messages"]
    assert parse_deploy(message["Body"]) == deploy
    assert json.loads(message["Body"])["origin"] == {"github_run_id": "9"}


def test_each_publish_takes_the_next_seq(fleet: Fleet, tmp_path: Path) -> None:
    seqs = []
    for i in range(3):
        artifact, _ = write_release(tmp_path / f"a{i}.tar.gz", {"v": str(i)})
        seqs.append(publisher(fleet).publish(API, artifact, template=SYMLINK).deploy.seq)
    assert seqs == [1, 2, 3]


def test_concurrent_publishers_never_share_a_seq_or_lose_an_update(fleet: Fleet, tmp_path: Path) -> None:
    artifact, _ = write_release(tmp_path / "a.tar.gz", {"v": "same"})
    got: list[int] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(4):
                release = f"w{index}-{round_}"
                got.append(publisher(fleet).publish(API, artifact, template=SYMLINK, release_id=release).deploy.seq)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(got) == list(range(1, 17))
    pointer = read_pointer(fleet.clients.s3, BUCKET, fleet.layout, API)
    assert pointer is not None
    assert pointer.deploy.seq == 16
    listed = fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix=fleet.layout.history_prefix(API))["Contents"]
    assert len(listed) == 16


def test_a_publisher_that_died_after_claiming_a_seq_does_not_wedge_the_channel(fleet: Fleet, tmp_path: Path) -> None:
    artifact, _ = write_release(tmp_path / "a.tar.gz", {"v": "1"})
    first = publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r1").deploy
    # Simulate a publisher killed between its history write (the claim of seq 2) and its pointer move.
    orphan = first.__class__(**{**first.__dict__, "seq": 2, "deploy_id": "orphan-deploy", "release_id": "r1"})
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=fleet.layout.history_key(API, 2), Body=orphan.to_json().encode())
    third = publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r1").deploy
    assert third.seq == 3
    pointer = read_pointer(fleet.clients.s3, BUCKET, fleet.layout, API)
    assert pointer is not None
    assert pointer.deploy.deploy_id == third.deploy_id


def test_a_release_id_is_immutable(fleet: Fleet, tmp_path: Path) -> None:
    a1, _ = write_release(tmp_path / "a1.tar.gz", {"v": "1"})
    a2, _ = write_release(tmp_path / "a2.tar.gz", {"v": "2"})
    publisher(fleet).publish(API, a1, template=SYMLINK, release_id="fixed")
    with pytest.raises(ReleaseConflict, match="already exists with different content"):
        publisher(fleet).publish(API, a2, template=SYMLINK, release_id="fixed")
    # Re-publishing identical content (a retried CI job) is fine and moves the channel on.
    again = publisher(fleet).publish(API, a1, template=SYMLINK, release_id="fixed")
    assert again.release_reused
    assert again.deploy.seq == 2


def test_republishing_the_same_directory_under_its_release_id_is_a_no_op_not_a_conflict(
    fleet: Fleet, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "build", {"index.html": "v1"})
    first = publisher(fleet).publish(
        API, pack_directory(tree, tmp_path / "1.tar.gz"), template=SYMLINK, release_id="ci-42"
    )
    retried = publisher(fleet).publish(
        API, pack_directory(tree, tmp_path / "2.tar.gz"), template=SYMLINK, release_id="ci-42"
    )
    assert not first.release_reused
    assert retried.release_reused


def test_a_missing_bucket_is_reported_before_anything_is_uploaded(fleet: Fleet, tmp_path: Path) -> None:
    artifact, _ = write_release(tmp_path / "a.tar.gz", {"v": "1"})
    missing = Publisher(fleet.clients, "no-such-bucket", fleet.topic_arn, fleet.layout)
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        missing.publish(API, artifact, template=SYMLINK)


def test_a_missing_topic_is_reported_before_anything_is_uploaded(fleet: Fleet, tmp_path: Path) -> None:
    artifact, _ = write_release(tmp_path / "a.tar.gz", {"v": "1"})
    topic = fleet.topic_arn.rsplit(":", 1)[0] + ":no-such-topic"
    with pytest.raises(ConfigError, match="no-such-topic"):
        Publisher(fleet.clients, BUCKET, topic, fleet.layout).publish(API, artifact, template=SYMLINK)
    assert "Contents" not in fleet.clients.s3.list_objects_v2(Bucket=BUCKET)


def s3_calls(fleet: Fleet) -> Counter[str]:
    """Every S3 operation the fleet's client makes from now on, counted by name."""
    calls: Counter[str] = Counter()
    fleet.clients.s3.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


def test_an_artifact_already_stored_is_not_uploaded_again_under_another_release_or_stage(
    fleet: Fleet, tmp_path: Path
) -> None:
    artifact, digest = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    first = publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r1").deploy
    calls = s3_calls(fleet)
    promoted = publisher(fleet).publish(Channel("staging", "web", "api"), artifact, template=SYMLINK, release_id="r2")
    # The manifest, the history entry and the pointer: nothing of the artifact's bytes.
    assert calls["PutObject"] == 3
    assert calls["CreateMultipartUpload"] == 0
    assert not promoted.release_reused  # a new release, sharing the stored artifact
    manifests = [
        parse_manifest(fleet.clients.s3.get_object(Bucket=BUCKET, Key=d.manifest_key)["Body"].read())
        for d in (first, promoted.deploy)
    ]
    assert {m.src for m in manifests} == {f"s3://{BUCKET}/{fleet.layout.blob_key(digest)}"}


def test_a_big_artifact_goes_up_in_parts_and_arrives_whole(fleet: Fleet, tmp_path: Path) -> None:
    artifact, digest = write_release(
        tmp_path / "big.tar.gz", {"blob.bin": random.Random(1).randbytes(20 << 20).hex()[: 20 << 20]}
    )
    calls = s3_calls(fleet)
    publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="big")
    assert calls["UploadPart"] >= 2
    stored = fleet.clients.s3.get_object(Bucket=BUCKET, Key=fleet.layout.blob_key(digest))["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == digest


@pytest.mark.parametrize("size", [3 << 10, 20 << 20], ids=["one PUT", "in parts"])
def test_the_checksum_computed_while_hashing_is_the_one_s3_holds_for_the_upload(
    fleet: Fleet, tmp_path: Path, size: int
) -> None:
    artifact, digest = write_release(tmp_path / "a.tar.gz", {"blob.bin": random.Random(2).randbytes(size).hex()[:size]})
    publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r1")
    held = fleet.clients.s3.head_object(Bucket=BUCKET, Key=fleet.layout.blob_key(digest), ChecksumMode="ENABLED")
    expected = file_artifact(artifact, sniff(artifact)).s3_checksum
    assert checksums_match(held["ChecksumSHA256"], expected)
    parts = -(-artifact.stat().st_size // UPLOAD_PART_BYTES)
    assert expected.endswith(f"-{parts}") == (parts > 1)  # in parts: a composite checksum


def test_a_stored_artifact_damaged_at_the_same_size_is_uploaded_again_and_so_repaired(
    fleet: Fleet, tmp_path: Path
) -> None:
    artifact, digest = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r1")
    key = fleet.layout.blob_key(digest)
    size = fleet.clients.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    # Same size, other bytes, written by someone who could write artifacts/ (or a bad disk):
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=key, Body=b"\0" * size, Metadata={"sha256": digest})
    calls = s3_calls(fleet)
    publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r2")
    assert calls["PutObject"] == 4  # the artifact again, then the manifest, the history entry and the pointer
    stored = fleet.clients.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == digest


def test_an_artifact_with_an_unsafe_member_is_refused_and_no_release_names_it(fleet: Fleet, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(tar_bytes(lambda archive: add_file(archive, "../outside", b"x")))
    with pytest.raises(PublishError, match=r"unsafe member: path with '\.\.'"):
        publisher(fleet).publish(API, evil, template=SYMLINK, release_id="evil")
    listed = fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix="deployer/")
    assert not [o["Key"] for o in listed.get("Contents", []) if "/releases/" in o["Key"] or "/channels/" in o["Key"]]


def test_a_release_published_before_artifacts_were_content_addressed_is_republished_as_it_is(
    fleet: Fleet, tmp_path: Path
) -> None:
    artifact, digest = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    old_key = fleet.layout.artifact_key("api", "old")
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=old_key, Body=artifact.read_bytes(), Metadata={"sha256": digest})
    old = Manifest(
        src=f"s3://{BUCKET}/{old_key}", checksum=digest, dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK
    )
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=fleet.layout.manifest_key("api", "old"), Body=old.to_yaml().encode())

    again = publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="old").deploy
    manifest = parse_manifest(fleet.clients.s3.get_object(Bucket=BUCKET, Key=again.manifest_key)["Body"].read())
    assert manifest.src == f"s3://{BUCKET}/{old_key}", "the stored release is kept as it was"


def test_bytes_whose_check_passed_on_this_machine_are_not_checked_again(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import publisher.artifact_file as publishing
    from publisher import pack
    from publisher.cache import PublishCache
    from publisher.pack import Compression

    cache = PublishCache(tmp_path / "cache")
    artifact, digest = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    cached = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout, cache=cache)
    checked: list[Path] = []
    real_check = pack.check_artifact

    def counting_check(path: Path, compression: Compression) -> None:
        checked.append(path)
        real_check(path, compression)

    monkeypatch.setattr(publishing, "check_artifact", counting_check)
    cached.publish(API, artifact, template=SYMLINK, release_id="r1")
    assert cache.checked(digest)
    assert checked == [artifact]
    cached.publish(API, artifact, template=SYMLINK, release_id="r2")
    assert checked == [artifact]  # the same bytes: the cache's verdict
    publisher(fleet).publish(API, artifact, template=SYMLINK, release_id="r3")
    assert checked == [artifact, artifact]  # no cache, no shortcut


def test_an_unsafe_artifact_is_refused_every_time_however_often_it_is_published(fleet: Fleet, tmp_path: Path) -> None:
    from publisher.cache import PublishCache

    cache = PublishCache(tmp_path / "cache")
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(tar_bytes(lambda archive: add_file(archive, "../outside", b"x")))
    cached = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout, cache=cache)
    for attempt in ("evil-1", "evil-2"):
        with pytest.raises(PublishError, match=r"unsafe member"):
            cached.publish(API, evil, template=SYMLINK, release_id=attempt)
    assert not cache.checked(file_artifact(evil, sniff(evil)).sha256)


#: What a CI job must not pay for: the agent, the apply engine, the fleet reader of --wait.
NOT_FOR_PUBLISHING = ("deployer.agent", "deployer.apply.engine", "deployer.apply.extract", "publisher.wait")


def _cli_in_python(fleet: Fleet, before: str, after: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`deployer ARGV` in a fresh interpreter (what it imports is what a CI job pays), with `before`
    run ahead of the CLI's import and `after` once it exited."""
    script = f"import sys\n{before}from deployer.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n{after}"
    publish = ["--bucket", BUCKET, "--topic-arn", fleet.topic_arn, "--stage", "prod", "--role", "web"]
    command = [*argv[:1], *(publish if argv[:1] == ("publish",) else []), *argv[1:]]
    return subprocess.run(
        [sys.executable, "-c", script, *command], capture_output=True, text=True, env=dict(os.environ)
    )


def test_help_and_publish_load_neither_the_agent_nor_the_apply_engine(fleet: Fleet, tmp_path: Path) -> None:
    artifact, _ = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    loaded = f"    print(sorted(m for m in sys.modules if m.startswith({NOT_FOR_PUBLISHING!r})), file=sys.stderr)\n"
    for argv in (["--help"], ["publish", "--component", "api", "--artifact", str(artifact)]):
        done = _cli_in_python(fleet, "", loaded, *argv)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == "[]", (argv[0], done.stderr[-2000:])


def test_publish_starts_hashing_its_artifact_before_it_loads_the_aws_sdk(fleet: Fleet, tmp_path: Path) -> None:
    """Importing boto3 and making the clients overlaps the hash only if the hash starts first."""
    artifact, _ = write_release(tmp_path / "a.tar.gz", {"index.html": "v1"})
    noting = (
        "import publisher.artifact_file as artifact_file\n"
        "started = artifact_file.ArtifactFile.__init__\n"
        "def noting(self, *args, **kwargs):\n"
        "    print('sdk loaded when hashing started:', 'botocore' in sys.modules, file=sys.stderr)\n"
        "    started(self, *args, **kwargs)\n"
        "artifact_file.ArtifactFile.__init__ = noting\n"
    )
    argv = ["publish", "--component", "api", "--artifact", str(artifact), "--release-id", "hashed-first"]
    done = _cli_in_python(fleet, noting, "    pass\n", *argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sdk loaded when hashing started: False" in done.stderr, done.stderr[-2000:]
    assert "release hashed-first as seq 1" in done.stdout
