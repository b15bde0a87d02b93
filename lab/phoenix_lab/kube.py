"""A minimal JSON REST client for the lab's apiserver, authenticated by client certificate.

The node agent talks to the apiserver at a few pods per second; plain dicts over urllib3
keep it light (no generated-model deserialisation) and make merge patches explicit.
"""
from __future__ import annotations

import json
from typing import Any, Iterator
from urllib.parse import urlencode

import urllib3


class KubeError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


class Kube:
    def __init__(self, server: str, ca_file: str, cert_file: str, key_file: str) -> None:
        self.server = server.rstrip("/")
        self.http = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED", ca_certs=ca_file, cert_file=cert_file, key_file=key_file,
            maxsize=8, retries=False, timeout=urllib3.Timeout(connect=5, read=30))

    def request(self, method: str, path: str, body: Any = None, *, params: dict | None = None,
                content_type: str = "application/json", ok_missing: bool = False) -> dict | None:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        data = json.dumps(body).encode() if body is not None else None
        r = self.http.request(method, url, body=data, headers={"Content-Type": content_type})
        if r.status == 404 and ok_missing:
            return None
        if r.status >= 300:
            raise KubeError(r.status, method, path, r.data.decode(errors="replace"))
        return json.loads(r.data) if r.data else {}

    def get(self, path: str, **kw) -> dict | None:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw) -> dict | None:
        return self.request("POST", path, body, **kw)

    def merge_patch(self, path: str, body: Any, **kw) -> dict | None:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json", **kw)

    def delete(self, path: str, body: Any = None, **kw) -> dict | None:
        return self.request("DELETE", path, body, **kw)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 60) -> Iterator[dict]:
        """Yield watch events until the server closes the stream."""
        params = {"watch": "1", "resourceVersion": resource_version,
                  "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"}
        r = self.http.request("GET", f"{self.server}{path}?{urlencode(params)}",
                              preload_content=False,
                              timeout=urllib3.Timeout(connect=5, read=timeout_seconds + 10))
        try:
            if r.status >= 300:
                raise KubeError(r.status, "WATCH", path, r.read().decode(errors="replace"))
            buf = b""
            for chunk in r.stream(4096):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            r.release_conn()
