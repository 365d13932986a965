"""Run offline vLLM engines, one after another in this one process, over token-id prompts.

Stdin: {"jobs": [job, ...]}; a job is {"name": str, "model": DIR, "env": {VAR: value or null},
"engine": {LLM kwargs}, "prompts": [[ids]],
"phases": [{"name": str, "sampling": {SamplingParams kwargs}, "one_at_a_time": bool}]}.
Stdout: for each job a line ``JOB name`` before its engine's log, then ``RESULT name {json}`` (phase name ->
[{"token_ids": [...], "prompt_logprobs": [...]}]) or ``FAILED name`` after the traceback.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uniprocess executor): one import of
torch and vLLM serves every job, where an engine of its own would cost three. A job's ``env`` is applied
before its engine is built, for what the plugin reads at load or run time (backend choice, kernel knobs);
what vLLM reads once per process (``VLLM_PLUGINS``) must be the same for the whole batch.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback


def _summary(out) -> dict:
    prompt_lp = None
    if out.prompt_logprobs is not None:
        # Position 0 has no logprob; later positions map token id -> Logprob for the actual token.
        prompt_lp = [
            None if lp is None else lp[tok].logprob
            for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
        ]
    return {"token_ids": list(out.outputs[0].token_ids), "prompt_logprobs": prompt_lp}


def _run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = {
        "max_model_len": 1024,
        "enforce_eager": True,
        "seed": 0,
        "distributed_executor_backend": "uni",
        **job.get("engine", {}),
    }
    llm = LLM(model=job["model"], **engine)
    try:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        result = {}
        for phase in job["phases"]:
            params = SamplingParams(**{"temperature": 0.0, **phase.get("sampling", {})})
            if phase.get("one_at_a_time"):
                outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
            else:
                outs = llm.generate(prompts, params, use_tqdm=False)
            result[phase["name"]] = [_summary(o) for o in outs]
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def _cleanup() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    gc.collect()


def main() -> None:
    jobs = json.load(sys.stdin)["jobs"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for job in jobs:
        print(f"JOB {job['name']}", flush=True)
        for name, value in job.get("env", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:
            result = _run(job)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            print(f"FAILED {job['name']}", flush=True)
        else:
            print(f"RESULT {job['name']} " + json.dumps(result), flush=True)
        finally:
            _cleanup()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreter teardown after vLLM sometimes aborts ("terminate called without an active exception",
    # SIGABRT) or hangs in a C++ thread destructor; every engine is already shut down, so skip it.
    os._exit(0)
