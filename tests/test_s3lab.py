"""The tests' S3 server works with the real client, and its relay cuts it off and brings it back."""

from __future__ import annotations

import pytest
import s3fs
from botocore.exceptions import EndpointConnectionError
from s3lab import S3Lab


def test_the_real_client_stores_and_reads_back_through_the_relay(s3_env: S3Lab) -> None:
    bucket = s3_env.new_bucket()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{bucket}/a/b.bin", b"x" * 1000)
    assert fs.cat(f"{bucket}/a/b.bin") == b"x" * 1000
    assert fs.ls(f"{bucket}/a") == [f"{bucket}/a/b.bin"]


def test_a_cut_relay_refuses_and_a_resumed_one_still_has_the_objects(s3_env: S3Lab) -> None:
    bucket = s3_env.new_bucket()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}})
    fs.pipe(f"{bucket}/kept.bin", b"kept")
    s3_env.cut()
    with pytest.raises(EndpointConnectionError, match="Could not connect"):
        s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}}).cat(
            f"{bucket}/kept.bin"
        )
    s3_env.resume()
    assert s3fs.S3FileSystem(skip_instance_cache=True).cat(f"{bucket}/kept.bin") == b"kept"


def test_wrong_keys_are_refused(s3_lab: S3Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_lab.new_bucket()
    for key, value in s3_lab.wrong_env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(PermissionError):
        s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{bucket}/x.bin", b"x")
