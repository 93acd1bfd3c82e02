"""What operators see of a node: the Prometheus registry that reads every component's
``statistics()``, OpenTelemetry tracing hooks (off unless ``OTEL_*`` asks), log lines
(text or JSON) and the event-loop stall monitor. Used by the backends and the server alike.
"""
