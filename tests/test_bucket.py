"""Finished LoRAs to an S3-compatible bucket: a real S3 API server (moto's) on loopback, links
fetched with plain HTTP, failures bounded in time and kept on the volume."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import requests

from handler_fast import handler
from tests.training_helpers import install_model, train, upload_photos, user_yaml

BUCKET = "loras"
MODEL = "nowy_dataset_1.3"


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("FASTBACKEND_BUCKET", BUCKET)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "test-secret-key")
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="test-access-key",
        aws_secret_access_key="test-secret-key",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    yield s3
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)


def a_lora_on_the_volume(data_root) -> bytes:
    data = bytes(range(256)) * 40
    folder = data_root / "output" / MODEL
    folder.mkdir(parents=True)
    (folder / f"{MODEL}.safetensors").write_bytes(data)
    return data


@pytest.mark.slow
def test_a_finished_training_goes_to_the_bucket_and_its_link_downloads_it(tiny_models, data_root, bucket):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer = train(user_yaml(model_path, steps=2))
    assert answer["status"] == "success", answer
    fetched = requests.get(answer["download_url"], timeout=30)  # no credentials: the link carries them
    assert fetched.status_code == 200
    assert hashlib.sha256(fetched.content).hexdigest() == answer["sha256"]
    keys = {item["Key"] for item in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert keys == {f"{MODEL}/{MODEL}.safetensors", f"{MODEL}/config.yaml", f"{MODEL}/metadata.json"}
    assert answer["bucket_key"] == f"{MODEL}/{MODEL}.safetensors" and answer["download_expires_at"]
    assert "test-secret-key" not in str(answer)


def test_download_model_with_url_answers_a_link_not_base64(data_root, bucket):
    data = a_lora_on_the_volume(data_root)
    answer = handler({"id": "d", "input": {"type": "download_model", "model": MODEL, "url": True}})
    assert answer["status"] == "success", answer
    assert "content" not in answer and answer["size"] == len(data)
    assert requests.get(answer["download_url"], timeout=30).content == data
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_url_without_bucket_settings_is_a_clear_invalid_request(data_root):
    a_lora_on_the_volume(data_root)
    answer = handler({"id": "d", "input": {"type": "download_model", "model": MODEL, "url": True}})
    assert answer["error_code"] == "invalid_request"
    assert answer["error"].startswith("input.url: a bucket is not configured on this worker: set FASTBACKEND_BUCKET")


def test_an_unreachable_bucket_fails_in_bounded_time_and_keeps_the_file(data_root, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    monkeypatch.setenv("FASTBACKEND_BUCKET", BUCKET)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("FASTBACKEND_BUCKET_TIMEOUT_S", "2")
    data = a_lora_on_the_volume(data_root)
    started = time.monotonic()
    answer = handler({"id": "d", "input": {"type": "download_model", "model": MODEL, "url": True}})
    assert time.monotonic() - started < 20
    assert answer["error_code"] == "upload_failed", answer
    assert answer["error"].startswith(f"bucket '{BUCKET}': {MODEL}.safetensors could not be uploaded")
    assert "very-secret" not in str(answer)
    assert (data_root / "output" / MODEL / f"{MODEL}.safetensors").read_bytes() == data


def test_a_partial_bucket_configuration_stops_the_worker_naming_what_is_missing(monkeypatch):
    from fastbackend import settings

    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "http://127.0.0.1:9")
    settings.check_all()  # runpod's variables alone may serve something else: no bucket, no complaint
    assert not settings.bucket_configured()
    monkeypatch.setenv("FASTBACKEND_BUCKET", BUCKET)
    with pytest.raises(ValueError, match="missing: BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY"):
        settings.check_all()


def test_a_missing_bucket_is_upload_failed_not_an_internal_error(data_root, bucket, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_BUCKET", "no-such-bucket")
    a_lora_on_the_volume(data_root)
    answer = handler({"id": "d", "input": {"type": "download_model", "model": MODEL, "url": True}})
    assert answer["error_code"] == "upload_failed", answer
    assert answer["error"].startswith(f"bucket 'no-such-bucket': {MODEL}.safetensors could not be uploaded")


def test_links_to_an_aws_bucket_are_signed_for_its_region(monkeypatch):
    from fastbackend import bucket as bucket_module

    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://s3.eu-central-1.amazonaws.com")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "s")
    url = bucket_module._client().generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    assert "%2Feu-central-1%2Fs3%2F" in url


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("BUCKET_ENDPOINT_URL", "s3.example.com", "must start with https://"),
        ("FASTBACKEND_BUCKET_TIMEOUT_S", "0", "must be above 0 seconds"),
        ("FASTBACKEND_BUCKET_URL_EXPIRY_S", "700000", "must be 1 to 604800 seconds"),
    ],
)
def test_bucket_settings_that_cannot_work_stop_the_worker(variable, value, says, monkeypatch):
    from fastbackend import settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=says):
        settings.check_all()


def test_a_stop_midway_through_an_upload_ends_it_and_leaves_nothing_in_the_bucket(data_root, bucket, monkeypatch):
    """A LoRA large enough to go up in parts; the stop comes after the first part: no object, and
    no multipart upload left open (boto3 aborts it), within a part's time."""
    import threading

    from fastbackend import bucket as bucket_module
    from fastbackend import stopping
    from tests.test_stop_phases import BOUND_S

    folder = data_root / "output" / MODEL
    folder.mkdir(parents=True)
    (folder / f"{MODEL}.safetensors").write_bytes(bytes(20_000_000))
    stop = threading.Event()
    signalled: list[float] = []
    real_client = bucket_module._client

    def client_whose_first_part_brings_the_stop():
        client = real_client()
        real_upload = client.upload_file

        def upload_file(*args, Callback, **options):
            def sent(count: int) -> None:
                if not stop.is_set():
                    signalled.append(time.monotonic())
                    stop.set()
                Callback(count)

            return real_upload(*args, Callback=sent, **options)

        client.upload_file = upload_file
        return client

    monkeypatch.setattr(bucket_module, "_client", client_whose_first_part_brings_the_stop)
    with stopping.watching(stop):
        answer = handler({"id": "d", "input": {"type": "download_model", "model": MODEL, "url": True}})
    assert time.monotonic() - signalled[0] < BOUND_S
    assert answer["error_code"] == "stopped", answer
    assert answer["error"].startswith(f"the upload of {MODEL}.safetensors to the bucket stopped by")
    assert answer["resend"].startswith(f"{MODEL}.safetensors is kept on the volume")
    assert bucket.list_objects_v2(Bucket=BUCKET).get("Contents", []) == []
    assert bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
