"""The HTTP app of a tool server: MCP's SSE endpoints (``/sse``, ``/messages/``, what vLLM's ``--tool-server``
connects to), ``/health`` for probes and ``/metrics`` for Prometheus."""

from __future__ import annotations

from typing import Any

from gptoss_vllm.tools.telemetry import ToolTelemetry


def mcp_app(server: Any, telemetry: ToolTelemetry, host: str) -> Any:
    """``server``'s (an MCP ``MCPServer``) Starlette app with the probe and metrics routes."""
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    app = server.sse_app(host=host)

    async def health(_request: Any) -> Response:
        return PlainTextResponse("ok")

    async def metrics(_request: Any) -> Response:
        body, content_type = telemetry.exposition()
        return Response(body, media_type=content_type)

    app.router.routes.extend([Route("/health", health), Route("/metrics", metrics)])
    return app


def run_app(app: Any, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
