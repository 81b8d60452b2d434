"""``--discovery kubernetes``: the EndpointSlices of the prefill, decode and
unified headless Services, listed and watched with the official
``kubernetes`` client, and re-listed in full every ``reconcile_s``.

Per Service a thread runs the blocking client: LIST (label selector
``kubernetes.io/service-name=<svc>``), then WATCH from the list's
resourceVersion, again and again (each watch ends after ``watch_timeout_s``;
BOOKMARKs move the version on). A 410 Gone (the version was compacted away)
re-lists at once; any other failure (unreachable, HTTP error, garbage)
backs off, doubling from ``backoff_min_s`` to ``backoff_max_s``, then
re-lists. The threads only hand results to the event loop, which owns the
view and publishes full snapshots.

The periodic LIST is what a watch alone cannot give: a DELETE lost across a
watch reconnect (vllm production-stack #1091/#656/#601, sglang #30270 kept a
dead pod for hours that way) is repaired within one period, and counted in
``splitserve:discovery_repairs_total``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from splitserve.router.discovery import DiscoveryConfig, DiscoveryFeed
from splitserve.router.endpoint_slices import merge_pods, service_selector, slice_pods
from splitserve.router.membership import DiscoveredPod, Snapshot

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The router pod's own namespace (its service account's), else "default"."""
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


def load_api_client() -> Any:
    """An ``ApiClient`` from the in-cluster service account, else the
    kubeconfig (``KUBECONFIG`` or ~/.kube/config). ``RuntimeError`` when
    neither is usable."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as in_cluster:
        try:
            # KUBECONFIG read now: the client reads it once, at its import.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                    client_configuration=configuration, persist_config=False)
        except (config.ConfigException, OSError) as kubeconfig:
            raise RuntimeError(
                "--discovery kubernetes: no in-cluster service account "
                f"({in_cluster}) and no usable kubeconfig ({kubeconfig})") from None
    configuration.retries = 0  # the source's own back-off retries (urllib3's would only add log noise)
    return client.ApiClient(configuration)


def _newer(version: str | None, than: str | None) -> bool:
    """Whether an event's resourceVersion may apply after a list at ``than``.
    Versions are opaque to clients; etcd's are integers, and only those are
    compared (anything else applies in arrival order)."""
    if not version or not than or not version.isdigit() or not than.isdigit():
        return True
    return int(version) > int(than)


class KubernetesDiscovery:
    """See the module doc. ``services`` maps pool -> Service name."""

    name = "kubernetes"

    def __init__(self, services: Mapping[str, str], namespace: str, port_name: str = "grpc",
                 reconcile_s: float = 30.0, api_client: Callable[[], Any] = load_api_client,
                 watch_timeout_s: float = 240.0, backoff_min_s: float = 0.5, backoff_max_s: float = 30.0,
                 request_timeout_s: float = 10.0) -> None:
        self.services = dict(services)
        self.namespace = namespace
        self.port_name = port_name
        self.reconcile_s = reconcile_s
        self.watch_timeout_s = watch_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.request_timeout_s = request_timeout_s
        self._api_client = api_client
        self._views: dict[str, dict[str, list[DiscoveredPod]]] = {role: {} for role in self.services}
        self._listed_at: dict[str, str | None] = {role: None for role in self.services}
        self._seen_at: dict[str, str | None] = {role: None for role in self.services}
        self._listed: set[str] = set()  # pools whose watch thread has listed once
        self._watches: set[Any] = set()

    @classmethod
    def from_config(cls, config: DiscoveryConfig) -> KubernetesDiscovery:
        services = {role: name for role, name in config.services().items() if name}
        return cls(services, config.namespace or default_namespace(), config.grpc_port_name,
                   config.reconcile_s)

    async def run(self, feed: DiscoveryFeed) -> None:
        loop = asyncio.get_running_loop()
        api = await asyncio.to_thread(self._api_client)
        # Our own executor: a LIST stuck on a dead API server must not hold up shutdown.
        executor = ThreadPoolExecutor(max_workers=len(self.services), thread_name_prefix="k8s-list")
        stop = threading.Event()

        def post(callback: Callable[..., None], *args: Any) -> None:
            if stop.is_set():
                return
            try:
                loop.call_soon_threadsafe(callback, feed, *args)
            except RuntimeError:  # the loop closed under a thread still finishing its request
                stop.set()

        for role, service in self.services.items():
            threading.Thread(target=self._watch_service, args=(api, role, service, post, stop),
                             name=f"k8s-watch:{service}", daemon=True).start()
        logger.info("kubernetes discovery: EndpointSlices of %s in namespace %s, port %r, full list every %g s",
                    ", ".join(f"{s} ({r})" for r, s in self.services.items()), self.namespace,
                    self.port_name, self.reconcile_s)
        try:
            while True:
                await asyncio.sleep(self.reconcile_s)
                for role, service in self.services.items():
                    try:
                        items, version = await loop.run_in_executor(executor, self._list, api, service)
                    except Exception as exc:  # noqa: BLE001 - any failure keeps the last good view
                        feed.failed(f"listing EndpointSlices of {service}: {_describe(exc)}")
                        continue
                    # Before a pool's own first list (a slow start), this list is no repair.
                    self._on_list(feed, role, items, version, "reconcile" if role in self._listed else "watch")
        finally:
            stop.set()
            for watch in list(self._watches):
                watch.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    # -- the threads (blocking client calls only; results go to the loop) --------

    def _list(self, api: Any, service: str) -> tuple[list[dict[str, Any]], str | None]:
        from kubernetes.client import DiscoveryV1Api

        result = DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            self.namespace, label_selector=service_selector(service),
            _request_timeout=self.request_timeout_s)
        items = [api.sanitize_for_serialization(item) for item in result.items or []]
        return items, result.metadata.resource_version if result.metadata else None

    def _watch_service(self, api: Any, role: str, service: str, post: Callable[..., None],
                       stop: threading.Event) -> None:
        from kubernetes import watch
        from kubernetes.client import DiscoveryV1Api
        from kubernetes.client.exceptions import ApiException

        endpoint_slices = DiscoveryV1Api(api)
        backoff = self.backoff_min_s
        version: str | None = None
        while not stop.is_set():
            try:
                if version is None:
                    items, version = self._list(api, service)
                    post(self._on_list, role, items, version, "watch")
                watcher = watch.Watch()
                self._watches.add(watcher)
                try:
                    for event in watcher.stream(
                            endpoint_slices.list_namespaced_endpoint_slice, self.namespace,
                            label_selector=service_selector(service), resource_version=version,
                            allow_watch_bookmarks=True, timeout_seconds=int(self.watch_timeout_s),
                            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + self.request_timeout_s)):
                        if not isinstance(event, dict):  # the client yields None for a line that is no JSON
                            raise ValueError(f"the watch of {service} sent something that is not an event")
                        version = watcher.resource_version or version
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            post(self._on_event, role, event["type"], event["raw_object"])
                        if stop.is_set():
                            break
                finally:
                    self._watches.discard(watcher)
                backoff = self.backoff_min_s
            except ApiException as exc:
                version = None
                if exc.status == 410:
                    logger.info("kubernetes discovery: watch of %s expired (410 Gone); listing again", service)
                    continue
                post(self._on_error, f"watching EndpointSlices of {service}: {_describe(exc)}")
                stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
            except Exception as exc:  # noqa: BLE001 - unreachable, garbage: back off, then list again
                version = None
                if stop.is_set():
                    return
                post(self._on_error, f"watching EndpointSlices of {service}: {_describe(exc)}")
                stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    # -- the event loop's side ---------------------------------------------------

    def _on_error(self, feed: DiscoveryFeed, reason: str) -> None:
        feed.failed(reason)

    def _on_list(self, feed: DiscoveryFeed, role: str, items: list[dict[str, Any]],
                 version: str | None, origin: str) -> None:
        if version and not _newer(version, self._seen_at[role]) and version != self._seen_at[role]:
            return  # a slow LIST, older than events applied meanwhile: the next one will do
        try:
            view = {str(item["metadata"]["name"]): slice_pods(role, item, self.port_name) for item in items}
        except (KeyError, TypeError, ValueError) as exc:
            feed.failed(f"a {role} EndpointSlice is malformed: {exc}")
            return
        self._views[role] = view
        self._listed_at[role] = self._seen_at[role] = version
        self._listed.add(role)
        self._publish(feed, origin)

    def _on_event(self, feed: DiscoveryFeed, role: str, kind: str, obj: dict[str, Any]) -> None:
        try:
            metadata = obj["metadata"]
            name = str(metadata["name"])
            if not _newer(metadata.get("resourceVersion"), self._listed_at[role]):
                return  # older than the list already applied
            pods = [] if kind == "DELETED" else slice_pods(role, obj, self.port_name)
        except (KeyError, TypeError, ValueError) as exc:
            feed.failed(f"a {role} EndpointSlice event is malformed: {exc}")
            return
        if kind == "DELETED":
            self._views[role].pop(name, None)
        else:
            self._views[role][name] = pods
        version = metadata.get("resourceVersion")
        if version and _newer(version, self._seen_at[role]):
            self._seen_at[role] = version
        self._publish(feed, "watch")

    def _publish(self, feed: DiscoveryFeed, origin: str) -> None:
        pods = merge_pods(p for view in self._views.values() for pods in view.values() for p in pods)
        try:
            snapshot = Snapshot.of(pods)
        except ValueError as exc:  # one address in two pools' Services
            feed.failed(str(exc))
            return
        feed.publish(snapshot, origin)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status:
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
    return f"{exc.__class__.__name__}: {exc}"
