"""Whether and how the runner traces: explicit providers, the app's global ones, or the
standard `OTEL_*` environment variables; None (nothing imported, nothing done) otherwise.

Imports nothing of OpenTelemetry unless tracing is configured: the runner's hooks are None
then, and its hot path pays one `is None` test.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..exceptions import UserError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from ..resilience import Breakers
    from .otel import RunTracing

__all__ = ["env_configured", "env_providers", "run_tracing"]

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
_SIGNALS = {"traces": ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            "metrics": ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")}
_KNOWN = ("otlp", "console", "none")

_built: dict[tuple[str | None, ...], tuple[Any, Any]] = {}
_lock = threading.Lock()


def run_tracing(tracer_provider: TracerProvider | None = None,
                meter_provider: MeterProvider | None = None,
                breakers: Breakers | None = None) -> RunTracing | None:
    """The runner's tracing hooks: explicit providers (either or both) win; else the app's
    global providers, if it installed any; else providers built from `OTEL_*` variables;
    else None. `OTEL_SDK_DISABLED=true` turns off all but explicit providers. With a meter
    provider, the state changes of `breakers` are counted."""
    if tracer_provider is None and meter_provider is None:
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        tracer_provider, meter_provider = _global_providers()
        if tracer_provider is None and meter_provider is None and env_configured():
            tracer_provider, meter_provider = env_providers()
        if tracer_provider is None and meter_provider is None:
            return None
    from .otel import RunTracing

    return RunTracing(tracer_provider, meter_provider, breakers)


def _global_providers() -> tuple[TracerProvider | None, MeterProvider | None]:
    """The providers an app set with `set_tracer_provider`/`set_meter_provider` (not the
    API's default proxies). An app that set one has imported the API: when it is not
    imported, nobody set any, and it is not imported here."""
    tp: TracerProvider | None = None
    mp: MeterProvider | None = None
    if "opentelemetry.trace" in sys.modules:
        from opentelemetry import trace

        found = trace.get_tracer_provider()
        if not isinstance(found, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            tp = found
    if "opentelemetry.metrics" in sys.modules:
        from opentelemetry import metrics

        meters = metrics.get_meter_provider()
        if type(meters).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider"):
            mp = meters
    return tp, mp


def env_configured() -> bool:
    """Do the `OTEL_*` variables ask for an exporter? (An exporter or an OTLP endpoint set;
    the SDK's default, OTLP to localhost, is not assumed: that would send every app's runs
    to a port nobody listens on.)"""
    names = (*_ENDPOINTS, "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER")
    return any(os.environ.get(n, "").strip() for n in names)


def _exporters(signal: str) -> list[str]:
    """The exporters of `signal` ("traces" or "metrics") the environment asks for."""
    var, endpoint = _SIGNALS[signal]
    value = os.environ.get(var, "").strip().lower()
    if not value:  # no exporter named: OTLP when an endpoint for it is set
        return ["otlp"] if (os.environ.get(endpoint, "").strip() or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()) else []
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in _KNOWN:
            raise UserError(
                f"{var}={name}: frugalflow builds the otlp, console and none exporters; "
                f"for {name}, install its exporter and set the global provider yourself")
    return [n for n in names if n != "none"]


def _protocol(signal: str) -> None:
    value = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
             or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if value != "http/protobuf":
        raise UserError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={value}: the otel extra exports OTLP over "
            "http/protobuf; set it to http/protobuf (collectors listen on port 4318)")


def env_providers() -> tuple[TracerProvider | None, MeterProvider | None]:
    """SDK providers built from the environment, once per process (per distinct settings):
    a BatchSpanProcessor per trace exporter, a periodic reader per metric exporter. Not
    installed globally: the app's own instrumentation stays the app's choice."""
    key = tuple(os.environ.get(n) for n in (
        *_ENDPOINTS, "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_PROTOCOL"))
    with _lock:
        hit = _built.get(key)
        if hit is None:
            hit = _built[key] = _build()
    return hit


def _build() -> tuple[TracerProvider | None, MeterProvider | None]:
    from opentelemetry.sdk.resources import Resource

    attrs = {} if (os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")) else {"service.name": "frugalflow"}
    resource = Resource.create(attrs)  # + OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    tp: TracerProvider | None = None
    mp: MeterProvider | None = None
    traces, metrics = _exporters("traces"), _exporters("metrics")
    if traces:
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        sdk_tp = SdkTracerProvider(resource=resource)
        for name in traces:
            if name == "otlp":
                _protocol("traces")
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                sdk_tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                sdk_tp.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        tp = sdk_tp
    if metrics:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )

        readers = []
        for name in metrics:
            exporter: MetricExporter
            if name == "otlp":
                _protocol("metrics")
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )

                exporter = OTLPMetricExporter()
            else:
                exporter = ConsoleMetricExporter()
            readers.append(PeriodicExportingMetricReader(exporter))
        mp = SdkMeterProvider(resource=resource, metric_readers=readers)
    return tp, mp
