"""The profile's arrival shape as a Locust ``LoadTestShape``: user count over the run, then stop."""

from __future__ import annotations

from locust import LoadTestShape

from gptoss_vllm.loadtest.profiles import Arrival


def shape_class(arrival: Arrival, users: int, duration_s: float) -> type[LoadTestShape]:
    class ProfileShape(LoadTestShape):
        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()
            if elapsed >= duration_s:
                return None
            target = arrival.users_at(elapsed / duration_s, users)
            return target, max(1.0, float(target))  # reach each step within about a second

    return ProfileShape
