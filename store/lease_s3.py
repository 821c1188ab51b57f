"""Writer-lease records on S3, by conditional writes (botocore; untested here: no S3 reachable).

The same protocol as ``LocalLeaseDir`` (see lease.py): the exclusive create of generation N+1 is a
``PutObject`` with ``If-None-Match: *`` (AWS S3 since 2024-08: 412 if the key exists, 409 on a
concurrent conditional write); a holder rewrites its own record with ``If-Match: <its ETag>``.
S3 lists and reads are strongly consistent (since 2020-12). Object stores that ignore the header
would let two drivers both "win": the backend refuses to run unless a probe create of an existing
key is rejected.
"""

from __future__ import annotations

import os
import uuid


class S3LeaseDir:
    def __init__(self, uri: str):
        try:
            import botocore.session
            from botocore.exceptions import ClientError
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
            raise ModuleNotFoundError(f"{uri}: the S3 writer lease needs botocore (pip install botocore)") from exc
        self._ClientError = ClientError
        self.uri = uri
        bucket, _, self.prefix = uri[len("s3://"):].partition("/")
        self.bucket = bucket
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint)
        self._etags: dict[int, str] = {}
        self._probe()

    def __str__(self) -> str:
        return self.uri

    def _key(self, gen: int) -> str:
        return f"{self.prefix}/gen-{gen:012d}.json"

    def _code(self, exc) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    def _probe(self) -> None:
        key = f"{self.prefix}/probe-{uuid.uuid4().hex}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
        except self._ClientError as exc:
            if self._code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise
        else:
            raise RuntimeError(f"{self.uri}: this object store ignores If-None-Match (a second exclusive create "
                               f"succeeded); a writer lease cannot be made safe on it")
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def generations(self) -> list[int]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=f"{self.prefix}/gen-"):
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                out.append(int(name[4:-5]))
        return sorted(out)

    def exists(self, gen: int) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(gen))
            return True
        except self._ClientError as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read(self, gen: int) -> bytes | None:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(gen))
        except self._ClientError as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return r["Body"].read()

    def create(self, gen: int, data: bytes) -> bool:
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._key(gen), Body=data, IfNoneMatch="*")
        except self._ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False  # exists, or a concurrent create is in flight: the caller looks again
            raise
        self._etags[gen] = r["ETag"]
        return True

    def replace(self, gen: int, data: bytes) -> None:
        from .lease import LeaseLost

        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._key(gen), Body=data, IfMatch=self._etags[gen])
        except self._ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                raise LeaseLost(f"{self.uri}: lease record {gen} was changed or removed by another process") from exc
            raise
        self._etags[gen] = r["ETag"]

    def delete(self, gen: int) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(gen))
