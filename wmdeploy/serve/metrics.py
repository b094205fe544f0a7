"""Prometheus metrics in the plain-text exposition format (version 0.0.4), written by hand.

Hand-written rather than ``prometheus_client`` because the server needs a dozen metric families and the
serve extra stays at fastapi + uvicorn. Updated from the event loop and the engine thread, hence the lock.

Families: HTTP requests (route, method, code) and gRPC requests (rpc, code); errors by kind (one label per cause, see ``app.error_kind``);
batch size; queue time (queued -> its batch starts) and compute time (the engine calls of one batch);
state-log time; evictions by reason and restores; live / persisted / persisted-only sessions and the state
arena's allocated slots and bytes (gauges).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in pairs]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1


class Metrics:
    """Counters, gauges (read at scrape time) and histograms of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = {}
        self.grpc_requests: dict[tuple[tuple[str, str], ...], int] = {}  # (rpc, code): gRPC's own family
        self.errors: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.queue_seconds = _Histogram(SECONDS_BUCKETS)
        self.compute_seconds = _Histogram(SECONDS_BUCKETS)
        self.persist_seconds = _Histogram(SECONDS_BUCKETS)
        self.request_seconds = _Histogram(SECONDS_BUCKETS)
        self.restores = 0
        # the OpenAI routes: completions by route and finish reason, tokens in/out/cached, and latencies
        self.completions: dict[tuple[tuple[str, str], ...], int] = {}
        self.lm_tokens = {"prompt": 0, "completion": 0, "cached": 0}
        self.first_token_seconds = _Histogram(SECONDS_BUCKETS)
        self.inter_token_seconds = _Histogram(SECONDS_BUCKETS)
        self.completion_seconds = _Histogram(SECONDS_BUCKETS + (10.0, 30.0, 60.0))
        self.expirations = 0  # persisted sessions deleted by --persist-ttl
        self.gauges: dict[str, tuple[str, Callable[[], Any], str]] = {}

    def request(self, route: str, method: str, code: int, seconds: float, step: bool) -> None:
        key = (("route", route), ("method", method), ("code", str(code)))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            if step:
                self.request_seconds.observe(seconds)

    def grpc_request(self, rpc: str, code: str, seconds: float, step: bool) -> None:
        """One gRPC call, or one message of a ``ModelStreamInfer`` stream (``code``: the gRPC status name)."""
        key = (("rpc", rpc), ("code", code))
        with self._lock:
            self.grpc_requests[key] = self.grpc_requests.get(key, 0) + 1
            if step:
                self.request_seconds.observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def queued(self, waits: list[float]) -> None:
        with self._lock:
            for w in waits:
                self.queue_seconds.observe(w)

    def batch(self, size: int, compute_s: float, persist_s: float | None) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.compute_seconds.observe(compute_s)
            if persist_s is not None:
                self.persist_seconds.observe(persist_s)

    def completion(self, route: str, finish: str, prompt: int, completion: int, cached: int,
                   first_token_s: float | None, gaps_s: list[float], seconds: float) -> None:
        key = (("route", route), ("finish_reason", finish))
        with self._lock:
            self.completions[key] = self.completions.get(key, 0) + 1
            self.lm_tokens["prompt"] += prompt
            self.lm_tokens["completion"] += completion
            self.lm_tokens["cached"] += cached
            if first_token_s is not None:
                self.first_token_seconds.observe(first_token_s)
            for gap in gaps_s:
                self.inter_token_seconds.observe(gap)
            self.completion_seconds.observe(seconds)

    def evicted(self, reason: str) -> None:
        with self._lock:
            self.evictions[reason] = self.evictions.get(reason, 0) + 1

    def restored(self) -> None:
        with self._lock:
            self.restores += 1

    def expired(self, n: int) -> None:
        with self._lock:
            self.expirations += n

    def gauge(self, name: str, help_text: str, read: Callable[[], Any], label: str = "") -> None:
        """A value read at scrape time; with ``label``, ``read`` returns {label value: value} (one series each)."""
        self.gauges[name] = (help_text, read, label)

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def histogram(name: str, help_text: str, h: _Histogram) -> None:
            family(name, "histogram", help_text)
            for edge, count in zip(h.buckets, h.counts):
                out.append(f'{name}_bucket{{le="{edge}"}} {count}')
            out.append(f'{name}_bucket{{le="+Inf"}} {h.n}')
            out.append(f"{name}_sum {h.total:.9g}")
            out.append(f"{name}_count {h.n}")

        with self._lock:
            family("wmdeploy_requests_total", "counter", "HTTP requests by route template, method and status code")
            for key, n in sorted(self.requests.items()):
                out.append(f"wmdeploy_requests_total{_labels(key)} {n}")
            family("wmdeploy_grpc_requests_total", "counter", "gRPC calls (stream messages one by one) by rpc and "
                   "status code")
            for key, n in sorted(self.grpc_requests.items()):
                out.append(f"wmdeploy_grpc_requests_total{_labels(key)} {n}")
            family("wmdeploy_errors_total", "counter", "refused or failed requests and steps, by kind")
            for kind, n in sorted(self.errors.items()):
                out.append(f"wmdeploy_errors_total{_labels((('kind', kind),))} {n}")
            family("wmdeploy_evictions_total", "counter", "sessions taken out of memory, by reason (ttl, capacity, "
                   "memory: --max-memory)")
            for reason in ("ttl", "capacity", "memory"):
                out.append(f'wmdeploy_evictions_total{{reason="{reason}"}} {self.evictions.get(reason, 0)}')
            family("wmdeploy_restores_total", "counter", "evicted or persisted sessions restored from --persist")
            out.append(f"wmdeploy_restores_total {self.restores}")
            family("wmdeploy_expired_sessions_total", "counter", "persisted sessions deleted after --persist-ttl "
                   "seconds without a step")
            out.append(f"wmdeploy_expired_sessions_total {self.expirations}")
            histogram("wmdeploy_batch_size", "sessions stepped together in one pool step", self.batch_size)
            histogram("wmdeploy_queue_seconds", "a step's wait from queued to the start of its batch",
                      self.queue_seconds)
            histogram("wmdeploy_compute_seconds", "the engine calls of one batch", self.compute_seconds)
            histogram("wmdeploy_persist_seconds", "writing a batch's snapshots to the state log (one fsync)",
                      self.persist_seconds)
            histogram("wmdeploy_step_request_seconds", "a step request, received to answered", self.request_seconds)
            family("wmdeploy_completions_total", "counter", "OpenAI completions answered, by route and finish reason")
            for key, n in sorted(self.completions.items()):
                out.append(f"wmdeploy_completions_total{_labels(key)} {n}")
            family("wmdeploy_completion_tokens_total", "counter", "tokens of OpenAI completions: prompt (of which "
                   "cached: reused from the prompt cache, not prefilled) and completion")
            for kind, n in self.lm_tokens.items():
                out.append(f'wmdeploy_completion_tokens_total{{kind="{kind}"}} {n}')
            histogram("wmdeploy_time_to_first_token_seconds", "an OpenAI completion, received to its first token",
                      self.first_token_seconds)
            histogram("wmdeploy_inter_token_seconds", "between two tokens of an OpenAI completion",
                      self.inter_token_seconds)
            histogram("wmdeploy_completion_seconds", "an OpenAI completion, received to its last token",
                      self.completion_seconds)
        for name, (help_text, read, label) in self.gauges.items():
            family(name, "gauge", help_text)
            if label:
                out.extend(f"{name}{_labels(((label, str(k)),))} {v:.9g}" for k, v in read().items())
            else:
                out.append(f"{name} {read():.9g}")
        return "\n".join(out) + "\n"
