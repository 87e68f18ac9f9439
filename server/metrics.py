"""The coordinator's Prometheus metrics (prometheus-client), served over HTTP when `metrics_listen` is set.

    metrics_listen: "127.0.0.1:9464"      # in the coordinator's YAML; then: curl 127.0.0.1:9464/metrics

| metric | type | labels | what |
|---|---|---|---|
| deltamask_round | gauge | | the open round (or the next) |
| deltamask_phase | gauge | phase | 1 for the coordinator's phase: head, mask, idle, done |
| deltamask_devices_registered, deltamask_devices_online | gauge | | enrolled devices; those heard from lately |
| deltamask_rounds_total | counter | phase, state | rounds closed or skipped |
| deltamask_uplink_bytes_total | counter | phase | update payload bytes taken |
| deltamask_downlink_bytes_total | counter | | theta bytes served (FetchTheta) |
| deltamask_round_uplink_bpp, deltamask_round_downlink_bpp | gauge | phase | the last closed round's bits per parameter |
| deltamask_round_accuracy | gauge | phase | the last closed round's held-out accuracy, a sampled mask (when evaluation is configured) |
| deltamask_round_accuracy_expected | gauge | | the last mask round's expected network w * theta (the mask `export` bakes by default) |
| deltamask_kept_round | gauge | | the round `export` bakes (`keep`: best or last; -1 before any closed) |
| deltamask_decode_seconds | histogram | phase | decoding and checking one update |
| deltamask_round_close_seconds | histogram | phase | closing a round (aggregation, theta, fsyncs) |
| deltamask_rpc_seconds | histogram | method, code | every Coordinator RPC, by its final status code |
| deltamask_device_energy_joules_total | counter | kind, phase | energy the devices measured for their updates |

The state gauges are read from the coordinator when scraped. The endpoint has no authentication: it
listens on the loopback address unless told otherwise (put it behind the host's firewall or a proxy).
"""
import inspect
import time
from typing import Dict, Optional, Tuple

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

PHASES = ("head", "mask", "refit", "idle", "done")
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """What the coordinator, its service and its interceptor report; one registry per coordinator."""

    def __init__(self, coordinator=None) -> None:
        self.registry = r = CollectorRegistry()
        self.rounds = Counter("deltamask_rounds", "rounds closed or skipped", ["phase", "state"], registry=r)
        self.uplink = Counter("deltamask_uplink_bytes", "update payload bytes taken", ["phase"], registry=r)
        self.downlink = Counter("deltamask_downlink_bytes", "theta bytes served", registry=r)
        self.uplink_bpp = Gauge("deltamask_round_uplink_bpp", "last closed round: mean uplink bits per parameter",
                                ["phase"], registry=r)
        self.downlink_bpp = Gauge("deltamask_round_downlink_bpp", "last closed round: downlink bits per parameter",
                                  ["phase"], registry=r)
        self.accuracy = Gauge("deltamask_round_accuracy", "last closed round: held-out accuracy", ["phase"],
                              registry=r)
        self.accuracy_expected = Gauge("deltamask_round_accuracy_expected",
                                       "last mask round: held-out accuracy of the expected network", registry=r)
        self.decode = Histogram("deltamask_decode_seconds", "decoding and checking one update", ["phase"],
                                buckets=_SECONDS, registry=r)
        self.close = Histogram("deltamask_round_close_seconds", "closing a round", ["phase"], buckets=_SECONDS,
                               registry=r)
        self.rpc = Histogram("deltamask_rpc_seconds", "Coordinator RPCs by final status code", ["method", "code"],
                             buckets=_SECONDS, registry=r)
        self.energy = Counter("deltamask_device_energy_joules", "energy the devices measured for their updates",
                              ["kind", "phase"], registry=r)
        if coordinator is not None:
            r.register(_State(coordinator))

    # --- what the coordinator calls ------------------------------------------------------------------
    def update_taken(self, kind: str, phase: str, nbytes: int, decode_s: float, measured: Dict) -> None:
        self.uplink.labels(phase).inc(nbytes)
        self.decode.labels(phase).observe(decode_s)
        if measured.get("energy_j", 0) > 0:
            self.energy.labels(kind or "unknown", phase).inc(measured["energy_j"])

    def round_closed(self, summary: Dict) -> None:
        phase = summary["phase"]
        self.rounds.labels(phase, summary["state"]).inc()
        self.close.labels(phase).observe(summary.get("close_s", 0.0))
        if summary["state"] == "closed":
            self.uplink_bpp.labels(phase).set(summary["uplink_bpp"])
            self.downlink_bpp.labels(phase).set(summary["downlink_bpp"])
            if "accuracy" in summary:
                self.accuracy.labels(phase).set(summary["accuracy"])
            if summary.get("accuracy_expected") is not None:
                self.accuracy_expected.set(summary["accuracy_expected"])

    def served(self, nbytes: int) -> None:
        self.downlink.inc(nbytes)

    def serve(self, listen: str) -> Tuple[object, int]:
        """Serve /metrics on `listen` ("host:port", port 0: any free one); returns (server, port)."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
        return server, server.server_address[1]


class _State:
    """Gauges read from the coordinator at scrape time."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator

    def describe(self):
        return []

    def collect(self):
        s = self.coordinator.status()
        yield GaugeMetricFamily("deltamask_round", "the open round (or the next)", value=s["round"])
        phase = GaugeMetricFamily("deltamask_phase", "1 for the coordinator's phase", labels=["phase"])
        for name in PHASES:
            phase.add_metric([name], 1.0 if s["phase"] == name else 0.0)
        yield phase
        yield GaugeMetricFamily("deltamask_devices_registered", "enrolled devices", value=s["registered"])
        yield GaugeMetricFamily("deltamask_devices_online", "devices heard from lately", value=s["online"])
        kept = self.coordinator.kept
        yield GaugeMetricFamily("deltamask_kept_round", "the round export bakes",
                                value=-1 if kept is None else kept.round)


class RpcTimer(grpc.aio.ServerInterceptor):
    """Times every call of one service into `Metrics.rpc`, labelled by method and final status code."""

    def __init__(self, metrics: Metrics, service: str) -> None:
        self.metrics, self.prefix = metrics, f"/{service}/"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method[len(self.prefix):]
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        behavior = getattr(handler, kind)
        if not inspect.iscoroutinefunction(behavior):
            return handler
        histogram = self.metrics.rpc

        async def timed(request, context):
            started, code = time.perf_counter(), None
            try:
                result = await behavior(request, context)
                code = _code(context) or "OK"
                return result
            except BaseException:
                code = _code(context) or "CANCELLED"
                raise
            finally:
                histogram.labels(method, code).observe(time.perf_counter() - started)

        return getattr(grpc, f"{kind}_rpc_method_handler")(timed, request_deserializer=handler.request_deserializer,
                                                          response_serializer=handler.response_serializer)


def _code(context) -> Optional[str]:
    code = getattr(context, "code", lambda: None)()
    return code.name if isinstance(code, grpc.StatusCode) else None
