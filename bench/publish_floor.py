"""Child for figure 5: the re-publish floor — the least any re-publish of a stored artifact must do.

Start Python, import boto3, make the two clients, hash the artifact (its key is its sha256), then
the requests no re-publish can skip, one after another: HEAD of the stored artifact, the history
claim (a conditional PUT), the pointer move, the SNS publish. Nothing is checked, signed, logged
or parsed: a deployer re-publish does all of this and more, so it cannot beat this process.

    python -m bench.publish_floor ARTIFACT BUCKET PREFIX TOPIC_ARN NAME
"""

from __future__ import annotations

import hashlib
import sys

import boto3


def main() -> None:
    path, bucket, prefix, topic_arn, name = sys.argv[1:6]
    s3, sns = boto3.client("s3"), boto3.client("sns")
    digest = hashlib.sha256()
    with open(path, "rb") as artifact:
        while chunk := artifact.read(1 << 20):
            digest.update(chunk)
    s3.head_object(Bucket=bucket, Key=f"{prefix}/artifacts/sha256/{digest.hexdigest()}")
    document = b'{"floor": "%s"}' % name.encode()
    s3.put_object(Bucket=bucket, Key=f"{prefix}/floor/history/{name}", Body=document, IfNoneMatch="*")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/floor/pointer", Body=document)
    sns.publish(TopicArn=topic_arn, Message=document.decode())


if __name__ == "__main__":
    main()
