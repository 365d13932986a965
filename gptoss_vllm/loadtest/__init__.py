"""Load tests: Locust users speaking the OpenAI API with streaming, workload profiles, SLO checks, reports."""
