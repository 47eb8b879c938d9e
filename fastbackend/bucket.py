"""Finished LoRAs to an S3-compatible bucket, and presigned links to download them.

On when ``FASTBACKEND_BUCKET`` and runpod's ``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID`` and
``BUCKET_SECRET_ACCESS_KEY`` are all set (``settings.check_all`` refuses a partial set at start).
Objects are ``<model>/<file>``: the LoRA, its config and its record. A link is a presigned GET
that works for ``FASTBACKEND_BUCKET_URL_EXPIRY_S`` without any credentials. Every connection
attempt and every read waits at most ``FASTBACKEND_BUCKET_TIMEOUT_S``, with two tries per
request; a failure is ``upload_failed``, naming the bucket, never a key, and the files stay on
the volume.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastbackend import settings, stopping
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.layout import LoraFolder

NOT_CONFIGURED = (
    "a bucket is not configured on this worker: set FASTBACKEND_BUCKET, BUCKET_ENDPOINT_URL, "
    "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY on the endpoint"
)


class UploadFailed(FastBackendError):
    code = ErrorCode.UPLOAD_FAILED


# The region inside an AWS endpoint (s3.eu-central-1.amazonaws.com); other S3-compatible
# stores ignore the region, but a presigned link is signed for one.
AWS_REGION = re.compile(r"s3[.-]([a-z0-9-]+)\.amazonaws\.com")


def _client():
    import boto3
    from botocore.config import Config

    timeout = settings.BUCKET_TIMEOUT_S.get()
    endpoint = settings.BUCKET_ENDPOINT_URL.get() or ""
    region = AWS_REGION.search(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=settings.BUCKET_ACCESS_KEY_ID.get(),
        aws_secret_access_key=settings.BUCKET_SECRET_ACCESS_KEY.get(),
        region_name=region.group(1) if region else "us-east-1",
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            signature_version="s3v4",
        ),
    )


def publish(folder: LoraFolder, path: Path, sha256: str) -> dict:
    """Upload ``path`` (a LoRA of ``folder``) with the folder's config and record; its link.

    Returns ``download_url``, ``download_expires_at`` and ``bucket_key``.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = settings.BUCKET.get()
    key = f"{folder.name}/{path.name}"
    kept = f"{path.name} is kept on the volume: download_model serves it (with url: true, through the bucket)"
    check_stop = stopping.stop_check(f"the upload of {path.name} to the bucket", resend=kept)
    stoppable = {"Callback": lambda sent: check_stop()}  # boto3 aborts a multipart upload that fails midway
    try:
        client = _client()
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}}, **stoppable)
        for extra in (folder.config, folder.metadata):
            if extra.is_file():
                client.upload_file(str(extra), bucket, f"{folder.name}/{extra.name}", **stoppable)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=settings.BUCKET_URL_EXPIRY_S.get()
        )
    except (Boto3Error, BotoCoreError, ClientError, OSError, ValueError) as exc:  # boto3 wraps refusals
        raise UploadFailed(
            f"bucket {bucket!r}: {path.name} could not be uploaded ({type(exc).__name__}); "
            f"it is kept on the volume at {path} (download_model still serves it)"
        ) from None
    expires = datetime.now(UTC) + timedelta(seconds=settings.BUCKET_URL_EXPIRY_S.get())
    return {"download_url": url, "download_expires_at": expires.isoformat(timespec="seconds"), "bucket_key": key}
