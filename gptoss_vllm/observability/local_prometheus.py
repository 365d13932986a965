"""A local Prometheus for ``gptoss-vllm serve --prometheus``: scrapes the ingress and every pool replica
(found through the ingress's ``/metrics/targets``), with the project's recording and alerting rules loaded.

It listens on 127.0.0.1 only, keeps its data in a temporary directory and stops with the server.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import httpx
import yaml

from gptoss_vllm.observability import ObservabilityError

SCRAPE_INTERVAL = "5s"
SD_REFRESH_INTERVAL = "15s"  # new replicas appear within this; each refresh is an access-log line
DEFAULT_PORT = 9090
RULES = files("gptoss_vllm.observability") / "prometheus" / "rules.yaml"
INSTALL_HINT = "run `make venv` (it installs Debian's prometheus package) or `apt-get install prometheus`"


class PrometheusError(ObservabilityError, RuntimeError):
    """The local Prometheus is missing, failed to start or is not configured correctly."""


def prometheus_config(ingress_url: str, rule_files: list[str], monitoring_token: str | None = None) -> dict:
    """Scrape configuration: HTTP service discovery from the ingress (with the monitoring token it requires);
    every target gets namespace=local."""
    discovery: dict = {"url": f"{ingress_url}/metrics/targets", "refresh_interval": SD_REFRESH_INTERVAL}
    if monitoring_token:
        discovery["authorization"] = {"type": "Bearer", "credentials": monitoring_token}
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": rule_files,
        "scrape_configs": [
            {
                "job_name": "gptoss-vllm",
                "http_sd_configs": [discovery],
                "relabel_configs": [{"target_label": "namespace", "replacement": "local"}],
            }
        ],
    }


class LocalPrometheus:
    """The ``prometheus`` process; use as a context manager."""

    def __init__(
        self, ingress_url: str, port: int, log_path: Path | None = None, monitoring_token: str | None = None
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError(f"--prometheus: the prometheus binary is not on PATH; {INSTALL_HINT}")
        self.url = f"http://127.0.0.1:{port}"
        self._dir = Path(tempfile.mkdtemp(prefix="gptoss-prometheus-"))
        rules = self._dir / "rules.yaml"
        rules.write_text(RULES.read_text())
        config = self._dir / "prometheus.yml"
        settings = prometheus_config(ingress_url, [str(rules)], monitoring_token)
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        config.chmod(0o600)  # it holds the monitoring token
        self._log = open(log_path or self._dir / "prometheus.log", "ab")  # noqa: SIM115 (lives with the process)
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher, which stops it in order
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2) as client:  # one TLS context for all polls, not one per call
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise PrometheusError(
                        f"prometheus exited with code {self._process.returncode}; its log: {self._log.name}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/-/ready").status_code == 200:
                        return
                time.sleep(0.3)
        raise PrometheusError(f"prometheus not ready after {timeout_s:.0f} s; its log: {self._log.name}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
