"""A pool's engine arguments as vLLM's server flags."""

from __future__ import annotations

from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.pool.engine_args import server_argv
from tests.support.serving_config import serving_config


def test_engine_args_become_vllm_flags():
    config = parse_config(
        serving_config(
            pools__deep__engine_args={
                "tensor-parallel-size": 2,
                "enable_prefix_caching": False,
                "gpu_memory_utilization": 0.9,
            }
        )
    )
    argv = server_argv(config.pools["deep"], "m")
    assert argv[:4] == ["--model", "/models/x", "--served-model-name", "m"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.9"
