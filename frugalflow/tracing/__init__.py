"""Tracing: each routed call's attempts as LangChain child runs, and OpenTelemetry spans
(run -> node -> attempt, GenAI semantic conventions) and metrics."""
