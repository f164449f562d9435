"""The S3 client every pipeline step uses, configured only from the environment.

boto3 reads the endpoint natively from ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) and the
credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or any other boto3 source: a
profile, an instance role), so the same code talks to the local SeaweedFS, MinIO or AWS S3.
``CNS_BUCKET`` names the bucket (default ``cns``). See docs/stack.md.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from urllib.parse import unquote_plus

from cns.errors import CNSError

DEFAULT_BUCKET = "cns"
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class S3Error(CNSError):
    code = "s3_error"


def bucket_name() -> str:
    return os.environ.get("CNS_BUCKET") or DEFAULT_BUCKET


def endpoint_url() -> str | None:
    """The custom S3 endpoint from the environment, or None for AWS S3 itself."""
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


def client():
    """A boto3 S3 client from the environment; path-style addressing for custom endpoints.

    Path style because SeaweedFS and MinIO serve buckets under the path by default and an IP
    endpoint cannot carry a bucket sub-domain; AWS S3 (no endpoint set) keeps boto3's default.
    """
    import boto3
    from botocore.config import Config

    # "Found credentials in environment variables" at INFO on every command is noise, not news.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    endpoint = endpoint_url()
    config = Config(s3={"addressing_style": "path"} if endpoint else {},
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5, read_timeout=60, max_pool_connections=32)
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise S3Error("environment", "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                      "(for the local stack: eval \"$(cns stack env)\")", "credentials_missing")
    return session.client("s3", endpoint_url=endpoint, config=config)


def client_errors() -> tuple[type[Exception], ...]:
    """The exceptions an S3 call raises for a server or network problem (not a bug of ours)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError, Boto3Error


def describe_error(exc: Exception, what: str) -> S3Error:
    """Turn a botocore error into a one-line S3Error naming the object or bucket."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "unknown")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403"):
            return S3Error(what, f"access refused by the S3 server ({code}): check AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY", "access_denied")
        if code in ("NoSuchBucket",):
            return S3Error(what, "bucket does not exist (set CNS_BUCKET or run `cns stack up`)", "no_such_bucket")
        return S3Error(what, f"S3 request failed ({code}: {err.get('Message', '')})")
    if isinstance(exc.__cause__, ClientError):
        return describe_error(exc.__cause__, what)  # boto3's S3UploadFailedError wraps the real one
    if isinstance(exc, EndpointConnectionError):
        return S3Error(what, f"cannot reach the S3 endpoint {endpoint_url() or 'AWS'} (is `cns stack up` running?)",
                       "endpoint_unreachable")
    return S3Error(what, f"S3 request failed ({exc})")


def list_objects(s3, bucket: str, prefix: str, server: dict | None = None) -> Iterator[tuple[str, str, int, str]]:
    """(key, ETag without quotes, size, LastModified as ISO text) of every object under ``prefix``, one paginated
    ListObjectsV2 (1,000 keys a page).

    botocore's generic XML parser spends ~0.2 s per 1,000 keys on shape handling, more than the
    server takes; so a ``before-parse`` hook reads the ``Contents`` with ElementTree and hands
    botocore only the page's envelope (IsTruncated, continuation token). Signing, retries and
    error handling stay botocore's; listing 4,000 keys drops from ~0.75 s to ~0.3 s.

    ``server``, when given, receives ``"date"``: the server's clock (the first page's ``Date``
    header, a datetime), the clock ``LastModified`` is measured by.
    """
    from email.utils import parsedate_to_datetime

    s3.meta.events.register("before-parse.s3.ListObjectsV2", _parse_contents, unique_id="cns-fast-contents")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, EncodingType="url"):
        date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if server is not None and date and "date" not in server:
            server["date"] = parsedate_to_datetime(date)
        yield from page.get("CnsContents", [])


def _parse_contents(response_dict, customized_response_dict, **_) -> None:
    if response_dict.get("status_code") != 200 or not response_dict.get("body"):
        return  # errors keep botocore's parsing and exceptions
    root = ET.fromstring(response_dict["body"])
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    encoded = root.findtext(f"{ns}EncodingType") == "url"  # as botocore's own decode_list_object_v2
    contents = []
    for item in root.findall(f"{ns}Contents"):
        key = item.findtext(f"{ns}Key")
        contents.append((unquote_plus(key) if encoded else key, item.findtext(f"{ns}ETag").strip('"'),
                         int(item.findtext(f"{ns}Size")), item.findtext(f"{ns}LastModified") or ""))
        root.remove(item)
    customized_response_dict["CnsContents"] = contents
    response_dict["body"] = ET.tostring(root)
