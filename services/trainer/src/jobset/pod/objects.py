"""Copies a directory between the pod and the run's storage: `s3://bucket/prefix` through boto3
(credentials from the environment or the service account, `AWS_ENDPOINT_URL` for S3-compatible
servers), anything else as a mounted path.

Usage: objects.py download SRC_URI DEST_DIR | objects.py upload SRC_DIR DEST_URI
"""
import os
import shutil
import sys


def split(uri):
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def download(src, dest):
    os.makedirs(dest, exist_ok=True)
    if not src.startswith("s3://"):
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return
    import boto3

    bucket, prefix = split(src)
    s3 = boto3.client("s3")
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) + 1:]
            if not rel or rel.startswith("/") or ".." in rel.split("/"):
                raise SystemExit(f"refusing object key {o['Key']!r}: it leaves {dest}")
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, o["Key"], path + ".part")
            os.replace(path + ".part", path)
            n += 1
    if n == 0:
        raise SystemExit(f"no objects under {src}")


def upload(src, dest):
    files = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs]
    files = sorted(f for f in files if not os.path.basename(f).startswith(".davinci-"))
    if not dest.startswith("s3://"):
        os.makedirs(dest, exist_ok=True)
        for f in files:
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(src, f), os.path.join(dest, f))
        return
    import boto3

    bucket, prefix = split(dest)
    s3 = boto3.client("s3")
    # config.json last: a reader that finds it finds a complete checkpoint.
    for f in sorted(files, key=lambda f: f == "config.json"):
        s3.upload_file(os.path.join(src, f), bucket, f"{prefix}/{f}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("download", "upload"):
        raise SystemExit(__doc__)
    (download if sys.argv[1] == "download" else upload)(sys.argv[2], sys.argv[3])
