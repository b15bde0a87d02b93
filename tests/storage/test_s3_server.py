"""The lab's S3 server is a real S3 implementation: boto3 round trips, multipart included."""
import hashlib
import os

import pytest
from boto3.s3.transfer import TransferConfig

pytestmark = pytest.mark.storage


def test_put_get_list_delete(s3_bucket):
    s3 = s3_bucket.client()
    s3.put_object(Bucket=s3_bucket.name, Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket=s3_bucket.name, Key="a/b.txt")["Body"].read() == b"hello"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket.name, Prefix="a/")["Contents"]]
    assert keys == ["a/b.txt"]
    s3.delete_object(Bucket=s3_bucket.name, Key="a/b.txt")
    assert s3.list_objects_v2(Bucket=s3_bucket.name, Prefix="a/")["KeyCount"] == 0


@pytest.mark.slow
def test_64mib_multipart_round_trip(s3_bucket, tmp_path):
    data = os.urandom(64 * 1024 * 1024)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    s3 = s3_bucket.client()
    cfg = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    s3.upload_file(str(src), s3_bucket.name, "big.bin", Config=cfg)
    head = s3.head_object(Bucket=s3_bucket.name, Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-8"), "expected an 8-part multipart upload"
    s3.download_file(s3_bucket.name, "big.bin", str(dst), Config=cfg)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()
