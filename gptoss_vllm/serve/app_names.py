"""The service's Ray Serve applications: the ingress's, and one per pool beside it.

A pool is its own application so that a redeploy restarts only what changed: Ray versions a declarative
application (``serveConfigV2``) as a whole, from its import path and arguments, so one application holding
every pool would restart them all for a change to one.
"""

from __future__ import annotations

APP_NAME = "gptoss"  # the ingress's application, at route prefix "/"


def pool_app_name(pool: str, app_name: str = APP_NAME) -> str:
    """The application of ``pool`` beside the ingress application ``app_name``; its one deployment is
    named ``pool``."""
    return f"{app_name}-pool-{pool}"


def app_of(deployment: str, app_name: str = APP_NAME) -> str:
    """The application a deployment of the service is in: ``ingress`` the ingress's, a pool its own."""
    return app_name if deployment == "ingress" else pool_app_name(deployment, app_name)
