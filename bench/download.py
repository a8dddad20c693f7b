"""Child for figure 2's baseline: stream one S3 object to a file with a single GET, like stretcher does."""

from __future__ import annotations

import shutil
import sys

import boto3


def main() -> None:
    bucket, key, path = sys.argv[1:4]
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"]
    with open(path, "wb") as out:
        shutil.copyfileobj(body, out, 1024 * 1024)


if __name__ == "__main__":
    main()
