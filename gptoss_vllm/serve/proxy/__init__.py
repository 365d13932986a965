"""What runs in Ray Serve's HTTP proxy, on every Ray node, before a request reaches the ingress.

``callback`` is the hook Ray's proxy loads (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``); ``settings`` reads the
gate's bounds from the environment (and builds that environment for the driver and the chart); ``gate`` is the
ASGI middleware; ``ray_errors`` rewrites the answers Ray's proxy makes itself; ``metrics`` counts what the gate
refuses.
"""
