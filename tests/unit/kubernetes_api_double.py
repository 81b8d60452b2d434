"""A TEST DOUBLE of the Kubernetes API server (not a cluster): just enough
of ``discovery.k8s.io/v1`` EndpointSlices for the router's ``kubernetes``
discovery, spoken over HTTP so the real ``kubernetes`` Python client talks
to it unchanged (no tests here).

Served: ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices``
with ``labelSelector=k=v``; as a LIST (``{"kind": "EndpointSliceList",
"metadata": {"resourceVersion"}, "items"}``) or, with ``watch=true``, a
chunked stream of one JSON event per line (``{"type": "ADDED|MODIFIED|
DELETED|BOOKMARK|ERROR", "object": ...}``) from ``resourceVersion`` on, ended
after ``timeoutSeconds``; a version older than the compaction point gets an
``ERROR`` event with a 410 ``Status``, as a real API server answers.

Faults a test can script: ``drop_watches`` (every open watch ends: the
client reconnects), ``hold_watches`` (new watches wait until released),
``delete(..., lose_event=True)`` (the change bumps the version but no watcher
will ever see it: a DELETE lost across a reconnect), ``compact`` (old
versions expire: 410 Gone), ``fail_next`` (HTTP errors or garbage bodies).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

PATH_PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"


def endpoint(address: str, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, pod: str = "") -> dict[str, Any]:
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    out: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if pod:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    return out


@dataclass
class _Event:
    version: int
    kind: str
    obj: dict[str, Any]


@dataclass
class FakeKubernetesAPI:
    """The double's state; ``start`` serves it on 127.0.0.1 (``url``)."""

    namespace: str = "default"
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    version: int = 100
    compacted: int = 0
    lists: list[str] = field(default_factory=list)    # label selector of every LIST served
    watches: list[str] = field(default_factory=list)  # "selector@version" of every WATCH begun
    failures: list[int | str] = field(default_factory=list)  # HTTP status, or "garbage"

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0  # bumped by drop_watches: open watches end
        self._held = False
        self._server: ThreadingHTTPServer | None = None

    # -- the state a test changes ------------------------------------------------

    def put(self, name: str, service: str, endpoints: list[dict[str, Any]], port: int,
            port_name: str = "grpc", address_type: str = "IPv4") -> None:
        with self._cond:
            self.version += 1
            kind = "MODIFIED" if name in self.slices else "ADDED"
            obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": name, "namespace": self.namespace,
                                "resourceVersion": str(self.version),
                                "labels": {"kubernetes.io/service-name": service}},
                   "addressType": address_type, "endpoints": endpoints,
                   "ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}
            self.slices[name] = obj
            self.history.append(_Event(self.version, kind, obj))
            self._cond.notify_all()

    def delete(self, name: str, lose_event: bool = False) -> None:
        with self._cond:
            self.version += 1
            obj = self.slices.pop(name)
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
            if not lose_event:
                self.history.append(_Event(self.version, "DELETED", obj))
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._cond:
            self.version += 1
            self.history.append(_Event(self.version, "BOOKMARK", {
                "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)}}))
            self._cond.notify_all()

    def compact(self) -> None:
        with self._cond:
            self.compacted = self.version

    def drop_watches(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def hold_watches(self, held: bool) -> None:
        with self._cond:
            self._held = held
            self._cond.notify_all()

    def fail_next(self, *failures: int | str) -> None:
        with self._cond:
            self.failures.extend(failures)

    def count(self, log: list[str], service: str) -> int:
        with self._cond:
            return sum(1 for entry in log if entry.startswith(f"kubernetes.io/service-name={service}"))

    # -- serving -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                api._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-k8s-api", daemon=True).start()

    def stop(self) -> None:
        self.drop_watches()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester",
                                                        "namespace": self.namespace}}]}))
        return path

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = url.path[len(PATH_PREFIX):].split("/") if url.path.startswith(PATH_PREFIX) else []
        if len(parts) != 2 or parts[1] != "endpointslices":
            return _send(handler, 404, _status(404, "NotFound", f"no route {url.path}"))
        if parts[0] != self.namespace:
            return _send(handler, 200, self._list_body([], ""))  # another namespace: empty
        with self._cond:
            failure = self.failures.pop(0) if self.failures else None
        if failure == "garbage":
            return _send(handler, 200, b'{"kind": "EndpointSliceList", "items": [{"metadata": 7}]\n')
        if failure is not None:
            return _send(handler, int(failure), _status(int(failure), "InternalError", "scripted failure"))
        selector = query.get("labelSelector", "")
        if query.get("watch") in ("true", "1"):
            return self._watch(handler, selector, int(query.get("resourceVersion") or 0),
                               float(query.get("timeoutSeconds") or 30))
        with self._cond:
            self.lists.append(selector)
            items = [s for s in self.slices.values() if _matches(s, selector)]
            body = self._list_body(items, str(self.version))
        _send(handler, 200, body)

    def _list_body(self, items: list[dict[str, Any]], version: str) -> bytes:
        return json.dumps({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                           "metadata": {"resourceVersion": version}, "items": items}).encode()

    def _watch(self, handler: BaseHTTPRequestHandler, selector: str, since: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self.watches.append(f"{selector}@{since}")
            while self._held:
                self._cond.wait(0.05)
            generation = self._generation
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            if since and since < self.compacted:
                _chunk(handler, {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
                return
            sent = since
            while True:
                with self._cond:
                    pending = [e for e in self.history if e.version > sent
                               and (e.kind == "BOOKMARK" or _matches(e.obj, selector))]
                    if not pending:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or generation != self._generation:
                            return
                        self._cond.wait(min(remaining, 0.05))
                        continue
                for event in pending:
                    _chunk(handler, {"type": event.kind, "object": event.obj})
                    sent = event.version
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            try:
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
            except OSError:
                pass
            handler.close_connection = True


def _matches(obj: dict[str, Any], selector: str) -> bool:
    if not selector:
        return True
    key, _, value = selector.partition("=")
    return obj.get("metadata", {}).get("labels", {}).get(key) == value


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes | dict[str, Any]) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _chunk(handler: BaseHTTPRequestHandler, event: dict[str, Any]) -> None:
    line = json.dumps(event).encode() + b"\n"
    handler.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
    handler.wfile.flush()
