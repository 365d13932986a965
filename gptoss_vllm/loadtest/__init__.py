"""Load tests: Locust users speaking the OpenAI API with streaming, workload profiles, SLO checks, reports."""


class LoadTestError(Exception):
    """Every error of ``gptoss_vllm.loadtest``: a profile, an SLO file or a run the load test cannot use."""
