"""Finished LoRAs to an S3-compatible bucket, and presigned links to download them.

On when ``FASTBACKEND_BUCKET`` and runpod's ``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID`` and
``BUCKET_SECRET_ACCESS_KEY`` are all set (``settings.check_all`` refuses a partial set at start).
Objects are ``<model>/<file>``: the LoRA, its config and its record. A link is a presigned GET
that works for ``FASTBACKEND_BUCKET_URL_EXPIRY_S`` without any credentials. Every call is bounded
in time (``FASTBACKEND_BUCKET_TIMEOUT_S``, two tries); a failure is ``upload_failed``, naming the
bucket, never a key, and the files stay on the volume.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastbackend import settings
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.layout import LoraFolder

NOT_CONFIGURED = (
    "a bucket is not configured on this worker: set FASTBACKEND_BUCKET, BUCKET_ENDPOINT_URL, "
    "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY on the endpoint"
)


class UploadFailed(FastBackendError):
    code = ErrorCode.UPLOAD_FAILED


def _client():
    import boto3
    from botocore.config import Config

    timeout = settings.BUCKET_TIMEOUT_S.get()
    return boto3.client(
        "s3",
        endpoint_url=settings.BUCKET_ENDPOINT_URL.get(),
        aws_access_key_id=settings.BUCKET_ACCESS_KEY_ID.get(),
        aws_secret_access_key=settings.BUCKET_SECRET_ACCESS_KEY.get(),
        region_name="us-east-1",  # S3-compatible stores ignore it; signing needs one
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
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = settings.BUCKET.get()
    client = _client()
    key = f"{folder.name}/{path.name}"
    try:
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        for extra in (folder.config, folder.metadata):
            if extra.is_file():
                client.upload_file(str(extra), bucket, f"{folder.name}/{extra.name}")
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=settings.BUCKET_URL_EXPIRY_S.get()
        )
    except (BotoCoreError, ClientError, OSError) as exc:
        raise UploadFailed(
            f"bucket {bucket!r}: {path.name} could not be uploaded ({type(exc).__name__}); "
            f"it is kept on the volume at {path} (download_model still serves it)"
        ) from None
    expires = datetime.now(UTC) + timedelta(seconds=settings.BUCKET_URL_EXPIRY_S.get())
    return {"download_url": url, "download_expires_at": expires.isoformat(timespec="seconds"), "bucket_key": key}
