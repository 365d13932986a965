"""Run a workload profile with Locust's own CLI (web UI, distributed workers):

    GPTOSS_VLLM_PROFILE=interactive locust -f gptoss_vllm/loadtest/locustfile.py --host http://127.0.0.1:8000

``gptoss-vllm loadtest`` runs the same user headless, bounded, with the SLO check and the report.
"""

import os
import time

from gptoss_vllm import envs
from gptoss_vllm.loadtest.profiles import load_profile
from gptoss_vllm.loadtest.user import OpenAIChatUser


class ProfileUser(OpenAIChatUser):
    abstract = False
    profile = load_profile(envs.PROFILE.get())
    model = envs.MODEL.get()
    api_key = os.environ.get("OPENAI_API_KEY")
    samples = []  # noqa: RUF012 (shared by all users of this process, read by nobody here)
    clock_start = time.monotonic()
