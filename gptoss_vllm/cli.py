"""The ``gptoss-vllm`` command: one entry point for building checkpoints, converting them and serving.

Bad arguments exit with code 2 and a message naming the argument; runtime failures exit with code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("gptoss_vllm")


def _make_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.checkpoints.config import ModelConfigError, parse_override
    from gptoss_vllm.presets import TRAINED_PRESETS, build_preset

    if args.preset in TRAINED_PRESETS and args.seed is not None:
        parser.error(f"--seed: the {args.preset} preset is trained weights; a seed does not apply")
    try:
        overrides = dict(parse_override(item) for item in args.set)
        out = build_preset(args.preset, args.out, args.seed or 0, args.dtype, args.force, overrides)
    except ModelConfigError as exc:
        parser.error(f"{'--set' if args.set else '--preset'}: {exc}")
    except FileExistsError as exc:
        parser.error(f"--out: {exc}")
    origin = "trained weights" if args.preset in TRAINED_PRESETS else f"seed {args.seed or 0}"
    print(f"wrote {args.dtype} gpt-oss checkpoint ({args.preset}, {origin}) to {out}")
    return 0


def _quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.checkpoints.quantize import CheckpointError, quantize_checkpoint

    try:
        out = quantize_checkpoint(args.src, args.dst)
    except (CheckpointError, FileExistsError) as exc:
        parser.error(str(exc))
    print(f"wrote MXFP4 checkpoint to {out}")
    return 0


def _check_writable(parser: argparse.ArgumentParser, json_path: str | None, flag: str = "--json") -> None:
    """A bench's output file must be writable before the bench spends its minutes."""
    if json_path:
        try:
            with open(json_path, "a"):
                pass
        except OSError as exc:
            parser.error(f"{flag}: cannot write {json_path}: {exc.strerror}")


def _check_keep(parser: argparse.ArgumentParser, keep: str | None) -> None:
    """A bench's --keep must be a directory (or not exist yet)."""
    if keep and Path(keep).exists() and not Path(keep).is_dir():
        parser.error(f"--keep: {keep} exists and is not a directory")


def _bench_moe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.bench.moe import format_table, run_bench

    _check_writable(parser, args.json)
    report = run_bench(args.json, seed=args.seed)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _bench_curves(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.capacity.measure import MeasureError, run

    _check_writable(parser, args.json)
    if args.output_tokens < 2:
        parser.error("--output-tokens: must be >= 2 (time per output token is taken after the first)")
    try:
        curve = run(
            args.url, args.json, model=args.model, concurrency=args.concurrency, prompt_lengths=args.prompt_tokens,
            output_tokens=args.output_tokens, effort=args.effort, max_num_seqs=args.max_num_seqs,
            kv_capacity_tokens=args.kv_capacity_tokens, replicas=args.replicas,
        )  # fmt: skip
    except (MeasureError, OSError) as exc:
        print(f"gptoss-vllm bench curves: {exc}", file=sys.stderr)
        return 1
    print(f"{'concurrency':>12}{'tpot s':>10}{'tok/s':>10}")
    for point in curve["decode"]:
        n, tpot = point["concurrency"], point["tpot_s"]
        print(f"{n:>12}{tpot:>10.4f}{n / tpot:>10.1f}")
    print(f"{'prompt tokens':>14}{'ttft s':>10}")
    for point in curve["prefill"]:
        print(f"{point['prompt_tokens']:>14}{point['ttft_s']:>10.3f}")
    print(
        f"max_num_seqs {curve['max_num_seqs']}, KV cache {curve['kv_capacity_tokens']} tokens ({curve['source']})"
    )
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.capacity.curve import Curve, CurveError
    from gptoss_vllm.capacity.plan import (
        PlanError,
        format_plan,
        load_traffic,
        plot_plan,
        run_plan,
        serving_fragment,
    )
    from gptoss_vllm.loadtest.slo import SloError, load_slo

    _check_writable(parser, args.json)
    if args.spill_queue_above < 0:
        parser.error("--spill-queue-above: must be >= 0")
    if not args.load > 0:
        parser.error(f"--load: must be > 0, got {args.load:g}")
    try:
        curves = {Path(path).stem: Curve.load(path) for path in args.curves or []}
    except CurveError as exc:
        parser.error(f"--curves: {exc}")
    if args.action == "validate":
        return _plan_validate(args, parser, next(iter(curves.values()), None))
    if not curves:
        parser.error("--curves: required (engine curve JSON files, from bench curves --json)")
    if not args.traffic:
        parser.error("--traffic: required (a traffic description YAML)")
    try:
        traffic = load_traffic(args.traffic).scaled(args.load)
    except PlanError as exc:
        parser.error(f"--traffic: {exc}")
    try:
        slo = load_slo(args.slo)
    except SloError as exc:
        parser.error(f"--slo: {exc}")
    import yaml

    report = run_plan(curves, traffic, slo, sorted(args.replicas), args.spill_queue_above, args.seed or 0)
    print(format_plan(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_plan(report, args.plot)
        print(f"wrote {args.plot}")
    if args.fragment:
        plan = next(iter(report["plans"].values()))
        entry = plan["totals"][str(max(args.replicas))]
        chosen = next(r for r in entry["layouts"] if r["layout"] == entry["recommended"])
        fragment = serving_fragment(chosen, max_ongoing=plan["curve"]["max_num_seqs"])
        Path(args.fragment).write_text(yaml.safe_dump(fragment, sort_keys=False))
        print(f"wrote {args.fragment} ({entry['recommended']} at {max(args.replicas)} replicas)")
    return 0


def _plan_validate(args: argparse.Namespace, parser: argparse.ArgumentParser, curve) -> int:
    from gptoss_vllm.capacity.curve import Curve, CurveError
    from gptoss_vllm.capacity.validate import format_validation, validate

    if not args.against:
        parser.error("--against: required by validate (bench routing's --json output)")
    try:
        routing = json.loads(Path(args.against).read_text())
        for arm in ("effort-pools", "shared-pool"):
            routing["arms"][arm]["efforts"]
        routing["workload"]["efforts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--against: {args.against} is not bench routing's JSON ({type(exc).__name__}: {exc})")
    if args.overhead_tokens < 0 or args.tokens_per_word <= 0:
        parser.error("--overhead-tokens must be >= 0 and --tokens-per-word > 0")
    if curve is None:
        if "curve" not in routing:
            parser.error(
                f"--curves: required, as {args.against} holds no curve (bench routing ran without --curves)"
            )
        try:
            curve = Curve.from_json(routing["curve"], f"{args.against}: curve")
        except CurveError as exc:
            parser.error(f"--against: {exc}")
    if "configs" not in routing:  # written before bench routing recorded its arms' configs: today's
        from gptoss_vllm.bench.routing import arm_configs
        from gptoss_vllm.serve.config_load import load_config

        routing["configs"] = arm_configs(load_config(None))
    report = validate(routing, curve, routing["configs"], overhead_tokens=args.overhead_tokens,
                      tokens_per_word=args.tokens_per_word, hidden_tokens=args.hidden_tokens, seed=args.seed)  # fmt: skip
    print(format_validation(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bench_e2e(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.bench.e2e import BenchError, Settings, format_table, run_bench
    from gptoss_vllm.checkpoints.config import build_config

    _check_writable(parser, args.json)
    _check_keep(parser, args.keep)
    settings = Settings(
        preset=args.preset,
        prefill_lengths=tuple(args.prefill),
        batches=tuple(args.batches),
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        kv_cache_gib=args.kv_cache_gib,
        context=args.context,
        stock=not args.no_stock,
        llama_cpp=not args.no_llama_cpp,
        rounds=args.rounds,
        blocks=args.blocks,
        full_runs=not args.only_head_to_head,
    )
    if args.only_head_to_head and (args.no_llama_cpp or not args.rounds):
        parser.error("--only-head-to-head: needs llama.cpp and at least one of --rounds")
    if settings.output_tokens < 2:
        parser.error("--output-tokens: must be >= 2 (decode is timed after the first token)")
    try:
        settings = settings.resolved(build_config(settings.preset))
    except BenchError as exc:
        parser.error(str(exc))
    try:
        report = run_bench(settings, args.json, Path(args.keep) if args.keep else None)
    except BenchError as exc:
        print(f"gptoss-vllm bench e2e: {exc}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.serve.config import ConfigError
    from gptoss_vllm.serve.config_load import load_config
    from gptoss_vllm.serve.launcher import Listen, port_is_free, run

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        parser.error(f"--config: {exc}")
    if args.address is not None:
        for name, pool in config.pools.items():
            if missing := pool.tools.without_url():
                parser.error(
                    f"--address: pools.{name}.tools.{missing[0]} has no url: on a cluster, give the url of a "
                    "tool server its workers reach (without --address, serve starts one here)"
                )
    listen = Listen(args.host, args.port)
    if args.address is None and not port_is_free(listen):
        parser.error(f"--port: {args.host}:{args.port} is already in use; choose another port")
    prometheus_port = None
    if args.prometheus:
        from gptoss_vllm.observability.local_prometheus import DEFAULT_PORT, INSTALL_HINT

        args.prometheus_port = args.prometheus_port or DEFAULT_PORT
        if shutil.which("prometheus") is None:
            parser.error(f"--prometheus: the prometheus binary is not on PATH; {INSTALL_HINT}")
        if not port_is_free(Listen("127.0.0.1", args.prometheus_port)):
            parser.error(f"--prometheus-port: 127.0.0.1:{args.prometheus_port} is already in use")
        prometheus_port = args.prometheus_port
    elif args.prometheus_port is not None:
        parser.error("--prometheus-port: only meaningful with --prometheus")
    return run(config, listen, args.address, args.ready_timeout, prometheus_port)


def _train_nano(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.nano.evaluate import evaluate_weights, format_table
    from gptoss_vllm.nano.train import TrainSettings, TrainStateError, asset_tensors, save_asset, train

    out = Path(args.out)
    if out.exists() and not args.force:
        parser.error(f"--out: {out} exists; pass --force to replace it")
    recipe = {"steps": args.steps, "batch_size": args.batch_size}
    settings = TrainSettings(seed=args.seed, **{k: v for k, v in recipe.items() if v is not None})
    checkpoints = (
        Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".checkpoint")
    )
    try:
        result = train(settings, checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every)
    except TrainStateError as exc:
        parser.error(f"--checkpoint-dir: {exc}")
    if result.resumed_at:
        print(f"resumed from step {result.resumed_at} ({checkpoints})")
    save_asset(result, out, {})  # written before evaluating, so that a failed evaluation keeps the weights
    scores = {
        "bf16": evaluate_weights(
            asset_tensors(result.model, result.vocab, quantise=False), "bf16", args.eval_per_family
        ),
        "mxfp4": evaluate_weights(asset_tensors(result.model, result.vocab), "mxfp4", args.eval_per_family),
    }
    print(format_table(scores))
    table = {name: [s.__dict__ for s in rows] for name, rows in scores.items()}
    save_asset(result, out, {"eval": table})
    shutil.rmtree(checkpoints, ignore_errors=True)  # the asset holds the run now
    print(f"trained in {result.seconds:.0f} s; wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _bench_overhead(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from gptoss_vllm.bench.overhead import Settings, format_table, run_bench

    _check_writable(parser, args.json)
    if args.direct_ingress and not args.relay:
        parser.error("--direct-ingress: only with --relay")
    if args.relay:
        from gptoss_vllm.bench.relay import STREAMS, format_relay_table, run_relay_bench

        streams = tuple(args.concurrency) if args.concurrency else STREAMS
        relay = run_relay_bench(streams, args.output_tokens or 128, direct_ingress=args.direct_ingress)
        print(format_relay_table(relay))
        if args.json:
            Path(args.json).write_text(json.dumps(relay, indent=2))
            print(f"wrote {args.json}")
        return 0
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model: {args.model} is not a checkpoint directory (no config.json)")
    settings = Settings(
        concurrency=tuple(args.concurrency or (4, 32)),
        rounds=args.rounds,
        requests=args.requests,
        streams=args.streams,
        output_tokens=args.output_tokens or 64,
        model=args.model,
        idle_s=float(args.idle_seconds),
    )
    report = run_bench(settings, args.json, Path(args.keep) if args.keep else None)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _bench_routing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.bench.routing import format_table, run_bench

    report = Path(args.report) if args.report else None
    _check_writable(parser, args.json)
    _check_writable(parser, args.curves, "--curves")
    result = run_bench(args.users, args.duration, report, args.json, args.curves)
    print(format_table(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _bench_soak(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.bench.soak import Settings, format_table, loopback_alias_works, run_soak

    _check_writable(parser, args.json)
    _check_keep(parser, args.keep)
    if not loopback_alias_works():
        parser.error("bench soak: this machine cannot connect from 127.0.0.2 (its unknown-key clients do)")
    if args.sample_every > args.duration:
        parser.error(f"--sample-every: {args.sample_every:g}s is longer than --duration {args.duration:g}s")
    settings = Settings(
        duration_s=args.duration, users=args.users, sample_every_s=args.sample_every, seed=args.seed
    )
    report = run_soak(settings, args.json, Path(args.keep) if args.keep else None)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report["lost_requests"] == 0 and report["leaked_slots"] == 0 else 1


def _policies(text: str) -> tuple[str, ...]:
    from gptoss_vllm.bench.lifecycle import POLICIES

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(POLICIES)}")
    return names


def _bench_lifecycle(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.bench.lifecycle import Settings, format_table, run_lifecycle

    _check_writable(parser, args.json)
    _check_keep(parser, args.keep)
    settings = Settings(
        policies=args.policies,
        step_users=args.users,
        step_seconds=args.step,
        output_tokens=args.output_tokens,
    )
    report = run_lifecycle(settings, args.json, Path(args.keep) if args.keep else None)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 1 if report["misses"] else 0


def _loadtest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from gptoss_vllm.loadtest.profiles import ProfileError, load_profile
    from gptoss_vllm.loadtest.slo import SloError, load_slo

    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        parser.error(f"--profile: {exc}")
    try:
        slo = load_slo(args.slo) if args.slo else None
    except SloError as exc:
        parser.error(f"--slo: {exc}")
    report_dir = Path(args.report)
    if report_dir.exists() and not report_dir.is_dir():
        parser.error(f"--report: {report_dir} exists and is not a directory")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    model = args.model or _served_model(args.host, api_key, parser)

    from gptoss_vllm.loadtest.runner import run_loadtest

    summary = run_loadtest(
        args.host.rstrip("/"), profile, args.users, args.duration, report_dir, slo=slo, slo_file=args.slo,
        max_requests=args.max_requests, api_key=api_key, model=model, prometheus_url=args.prometheus, seed=args.seed,
    )  # fmt: skip
    print(format_loadtest(summary))
    print(f"report: {report_dir / 'report.html'}  summary: {report_dir / 'summary.json'}")
    if not summary["slo"]["passed"]:
        print("SLO missed:\n  " + "\n  ".join(summary["slo"]["violations"]), file=sys.stderr)
        return 1
    return 0


def _served_model(host: str, api_key: str | None, parser: argparse.ArgumentParser) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{host.rstrip('/')}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        parser.error(f"--host: cannot reach {host}: {exc}")
    if answer.status_code != 200:
        parser.error(f"--host: {host}/v1/models answered {answer.status_code}: {answer.text[:200]}")
    return answer.json()["data"][0]["id"]


def format_loadtest(summary: dict) -> str:
    columns = ("requests", "failures", "ttft_p50_s", "ttft_p95_s", "answer_ttft_p95_s", "tpot_p50_s", "tpot_p95_s",
               "reasoning_tokens", "answer_tokens", "goodput_rps")  # fmt: skip
    lines = [f"{'effort':<8}" + "".join(f"{c:>19}" for c in columns)]
    for effort, figures in summary["efforts"].items():
        cells = []
        for column in columns:
            value = figures.get(column)
            cells.append(
                f"{'-' if value is None else (f'{value:.3f}' if isinstance(value, float) else value):>19}"
            )
        lines.append(f"{effort:<8}" + "".join(cells))
    return "\n".join(lines)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 2m or 90, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _tools_python(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.tools.python_server import serve
    from gptoss_vllm.tools.sandbox import Limits, SandboxUnavailable

    if args.memory_mib < 64:
        parser.error(f"--memory-mib: at least 64 (the interpreter's own), got {args.memory_mib}")
    limits = Limits(
        cpu_seconds=args.cpu_seconds,
        wall_seconds=float(args.wall_seconds),
        memory_bytes=args.memory_mib << 20,
        processes=args.processes,
        output_bytes=args.output_kib << 10,
    )
    try:
        serve(args.host, args.port, limits, args.slots, args.session_files_mib << 20)
    except SandboxUnavailable as exc:
        print(f"gptoss-vllm tools python: no sandbox, so no server: {exc}", file=sys.stderr)
        return 1
    return 0


def _tools_browser(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.tools.browser_server import serve
    from gptoss_vllm.tools.search_index import HttpSearch, LocalIndex, SearchIndexError

    if bool(args.index) == bool(args.search_url):
        parser.error("--index/--search-url: give exactly one search backend")
    if args.search_url and not args.search_url.startswith(("http://", "https://")):
        parser.error(f"--search-url: an http(s) URL, got {args.search_url!r}")
    try:
        backend = LocalIndex(Path(args.index)) if args.index else HttpSearch(args.search_url)
    except SearchIndexError as exc:
        parser.error(f"--index: {exc}")
    serve(args.host, args.port, backend)  # until SIGINT/SIGTERM (uvicorn's own handlers)
    return 0


def _tools_index(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.tools.search_index import SearchIndexError, build_index

    try:
        count = build_index(Path(args.docs), Path(args.out))
    except SearchIndexError as exc:
        parser.error(f"DOCS: {exc}")
    except OSError as exc:
        parser.error(f"--out: cannot write {args.out}: {exc.strerror}")
    print(f"indexed {count} documents into {args.out}")
    return 0


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1..65535, got {value}")
    return value


def _positive_ints(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gptoss-vllm`` (exposed for docs and tests)."""
    from gptoss_vllm.checkpoints.config import PRESETS

    parser = argparse.ArgumentParser(prog="gptoss-vllm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mm = sub.add_parser(
        "make-model",
        help="write a gpt-oss checkpoint (HF layout, MXFP4 or bf16 experts) with deterministic weights",
        description="Write a gpt-oss checkpoint in the exact HF layout of openai/gpt-oss-20b, "
        "with weights drawn deterministically from --seed.",
    )
    mm.add_argument("--out", required=True, help="directory to create")
    mm.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="base configuration (default: tiny)"
    )
    mm.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a GptOssConfig field, e.g. --set num_hidden_layers=2 (repeatable; values are YAML)",
    )
    mm.add_argument("--seed", type=_non_negative_int, default=None, help="weight seed (default: 0)")
    mm.add_argument("--dtype", choices=["mxfp4", "bf16"], default="mxfp4", help="expert weight format")
    mm.add_argument("--force", action="store_true", help="replace --out if it exists")
    mm.set_defaults(handler=_make_model, subparser=mm)

    qz = sub.add_parser(
        "quantize",
        help="convert a bf16 gpt-oss checkpoint to MXFP4 experts",
        description="Convert a bf16 HF gpt-oss checkpoint (single or sharded safetensors) to the MXFP4 "
        "layout of openai/gpt-oss, streaming tensor by tensor.",
    )
    qz.add_argument("src", help="bf16 checkpoint directory")
    qz.add_argument("dst", help="new directory for the MXFP4 checkpoint")
    qz.set_defaults(handler=_quantize, subparser=qz)

    tn = sub.add_parser(
        "train-nano",
        help="train the nano canary model from scratch on CPU and write its weights asset",
        description="Train nano (gpt-oss architecture, harmony, effort-aware) on synthetic tasks, report its "
        "accuracy per effort with bf16 and MXFP4 experts, and write the asset make-model --preset nano expands.",
    )
    tn.add_argument("--out", required=True, help="asset file to write (.safetensors)")
    tn.add_argument("--seed", type=_non_negative_int, default=0, help="data and initialisation seed")
    tn.add_argument("--steps", type=_positive_int, help="optimizer steps (default: the asset's recipe)")
    tn.add_argument(
        "--batch-size", type=_positive_int, help="sequences per step (default: the asset's recipe)"
    )
    tn.add_argument(
        "--eval-per-family", type=_positive_int, default=25, metavar="N", help="held-out tasks per family"
    )
    tn.add_argument("--force", action="store_true", help="replace --out if it exists")
    tn.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="where the run saves its state and a stopped run goes on from (default: OUT.checkpoint)",
    )
    tn.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=100,
        metavar="N",
        help="save every N steps (default 100)",
    )
    tn.set_defaults(handler=_train_nano, subparser=tn)

    sv = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible service (Ray Serve, pools by reasoning effort)",
        description="Deploy the gpt-oss service on Ray Serve and wait until every pool is ready. Without "
        "--config: the embedded default (two pools of the nano model on this machine).",
    )
    sv.add_argument("--config", metavar="FILE", help="serving config YAML (default: the embedded default)")
    sv.add_argument("--address", metavar="RAY_ADDRESS", help="join this Ray cluster instead of starting one")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    sv.add_argument("--port", type=_port, default=8000, help="listen port (default: 8000)")
    sv.add_argument(
        "--ready-timeout", type=_non_negative_int, default=900, metavar="S", help="give up after S seconds"
    )
    sv.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a local Prometheus on 127.0.0.1 scraping the ingress and every replica, rules loaded",
    )
    sv.add_argument(
        "--prometheus-port", type=_port, default=None, help="the local Prometheus's port (default: 9090)"
    )
    sv.set_defaults(handler=_serve, subparser=sv)

    tools = sub.add_parser("tools", help="gpt-oss's built-in tools as MCP servers (vllm --tool-server)")
    tools_sub = tools.add_subparsers(dest="tool", required=True, metavar="TOOL")
    py = tools_sub.add_parser(
        "python",
        help="the python tool: each call in a fresh bubblewrap sandbox",
        description="Serve gpt-oss's python tool over MCP (SSE at /sse; /health, /metrics). Each call runs in a "
        "fresh sandbox: no network, a read-only system, a private /tmp, and the limits below. Needs bubblewrap.",
    )
    py.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    py.add_argument("--port", type=_port, default=8765, help="listen port (default: 8765)")
    py.add_argument("--cpu-seconds", type=_positive_int, default=10, help="CPU seconds per call (default 10)")
    py.add_argument(
        "--wall-seconds", type=_positive_int, default=30, help="wall seconds per call (default 30)"
    )
    py.add_argument("--memory-mib", type=_positive_int, default=512, help="memory per process (default 512)")
    py.add_argument("--processes", type=_positive_int, default=16, help="processes per call (default 16)")
    py.add_argument("--output-kib", type=_positive_int, default=64, help="output per call (default 64)")
    py.add_argument("--slots", type=_positive_int, default=4, help="calls at once; more wait (default 4)")
    py.add_argument(
        "--session-files-mib",
        type=_non_negative_int,
        default=0,
        help="keep /session across a session's calls, up to this size (default 0: keep nothing)",
    )
    py.set_defaults(handler=_tools_python, subparser=py)
    br = tools_sub.add_parser(
        "browser",
        help="the browser tool: search, open and find over a local index or your search service",
        description="Serve gpt-oss's browser tool over MCP (SSE at /sse; /health, /metrics), over a local "
        "full-text index (--index, built by `tools index`) or an HTTP search service (--search-url).",
    )
    br.add_argument("--index", metavar="FILE", help="a local index built by `gptoss-vllm tools index`")
    br.add_argument("--search-url", metavar="URL", help="your search service (GET /search and /document)")
    br.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    br.add_argument("--port", type=_port, default=8766, help="listen port (default: 8766)")
    br.set_defaults(handler=_tools_browser, subparser=br)
    ix = tools_sub.add_parser(
        "index",
        help="build the browser's local full-text index from a folder of documents",
        description="Index every .md, .txt and .html file under DOCS into one SQLite FTS5 file (replaced "
        "atomically).",
    )
    ix.add_argument("docs", metavar="DOCS", help="folder of documents")
    ix.add_argument("--out", required=True, metavar="FILE", help="the index file to write")
    ix.set_defaults(handler=_tools_index, subparser=ix)

    lt = sub.add_parser(
        "loadtest",
        help="headless Locust load test of an OpenAI endpoint, per-effort figures, SLO check, report",
        description="Run a workload profile against --host for --duration with --users, write summary.json, "
        "CSVs and an HTML report into --report, and exit 1 when an objective of --slo is missed.",
    )
    lt.add_argument("--host", required=True, metavar="URL", help="the service, e.g. http://127.0.0.1:8000")
    lt.add_argument(
        "--profile", required=True, metavar="NAME", help="interactive, agentic, mixed-ramp, or a YAML file"
    )
    lt.add_argument(
        "--users", type=_positive_int, default=4, help="concurrent users at full load (default 4)"
    )
    lt.add_argument(
        "--duration", type=_duration, default=60.0, metavar="D", help="30s, 2m, ... (default 60s)"
    )
    lt.add_argument("--max-requests", type=_positive_int, metavar="N", help="also stop after N requests")
    lt.add_argument(
        "--slo",
        metavar="NAME|FILE",
        help="SLOs (per effort p50/p95 TTFT and TPOT, error rate, goodput): a shipped file's name or a YAML file",
    )
    lt.add_argument("--report", required=True, metavar="DIR", help="where summary.json, CSVs and HTML go")
    lt.add_argument("--api-key", help="bearer key (default: $OPENAI_API_KEY)")
    lt.add_argument("--model", help="model name (default: the first of the host's /v1/models)")
    lt.add_argument(
        "--prometheus", metavar="URL", help="plot replicas and queue over time from this Prometheus"
    )
    lt.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the users' choices")
    lt.set_defaults(handler=_loadtest, subparser=lt)

    plan = sub.add_parser(
        "plan",
        help="capacity plan: one shared pool vs effort pools (split, with spillover) at each total of replicas, "
        "simulated from measured engine curves against a traffic description and SLOs",
    )
    plan.add_argument("action", nargs="?", choices=["validate"],
                      help="validate: replay bench routing's workload (--against) and compare with its arms")  # fmt: skip
    plan.add_argument("--curves", nargs="+", metavar="FILE",
                      help="engine curve JSON files (bench curves --json), one plan per curve; validate: the "
                      "curve of the routing run's machine (default: the one bench routing --curves measured)")  # fmt: skip
    plan.add_argument("--traffic", metavar="FILE", help="traffic description YAML (see README)")
    plan.add_argument("--against", metavar="ROUTING_JSON", help="validate: bench routing's --json output")
    plan.add_argument("--overhead-tokens", type=int, default=100,
                      help="validate: prompt tokens besides the words (harmony's framing; default 100)")  # fmt: skip
    plan.add_argument("--tokens-per-word", type=float, default=1.3, help="validate: default 1.3")
    plan.add_argument("--hidden-tokens", type=_non_negative_int, default=3,
                      help="validate: tokens a chat stream makes before its first visible delta (harmony's "
                      "<|channel|>analysis<|message|>; default 3)")  # fmt: skip
    plan.add_argument("--slo", metavar="NAME|FILE", default="gpu-20b",
                      help="per-effort SLOs: a shipped file's name (gpu-20b, cpu-nano; in "
                      "gptoss_vllm/loadtest/slos/) or a YAML file (default gpu-20b)")  # fmt: skip
    plan.add_argument("--replicas", type=_positive_ints, default=[4, 16, 64], metavar="N,N",
                      help="totals of replicas to plan for (default 4,16,64)")  # fmt: skip
    plan.add_argument("--spill-queue-above", type=int, default=2, metavar="N",
                      help="the spillover layouts' queue_above (default 2)")  # fmt: skip
    plan.add_argument("--load", type=float, default=1.0, metavar="F",
                      help="the traffic's rate times F (default 1.0; 1.2: a fifth more than described)")  # fmt: skip
    plan.add_argument("--seed", type=_non_negative_int,
                      help="the simulated arrivals' seed (default 0); validate: the load test's (default: the "
                      "one the routing JSON records)")  # fmt: skip
    plan.add_argument("--json", metavar="FILE", help="also write the plan as JSON to FILE")
    plan.add_argument("--plot", metavar="PNG", help="draw attainment against total replicas into PNG")
    plan.add_argument("--fragment", metavar="YAML",
                      help="write the recommendation at the largest total as a serving config's pools")  # fmt: skip
    plan.set_defaults(handler=_plan, subparser=plan)
    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    moe = bench_sub.add_parser(
        "moe",
        help="one gpt-oss-20b MoE layer: the CPU kernel vs the reference vs vLLM's bf16 MoE, M = 1..512",
    )
    moe.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    moe.add_argument("--seed", type=_non_negative_int, default=0, help="weights and routing seed")
    moe.set_defaults(handler=_bench_moe, subparser=moe)
    e2e = bench_sub.add_parser(
        "e2e",
        help="a whole model (gpt-oss-20b's shape, MXFP4 experts) offline through vLLM: prefill and decode "
        "tokens/s, peak RSS, per plugin backend and stock vLLM, against the memory roofline",
    )
    e2e.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    e2e.add_argument("--keep", metavar="DIR", help="keep each engine's log and figures in DIR")
    e2e.add_argument("--preset", choices=sorted(set(PRESETS) - {"nano"}), default="gpt-oss-20b",
                     help="the checkpoint's shape, built once into the cache (default gpt-oss-20b)")  # fmt: skip
    e2e.add_argument("--prefill", type=_positive_ints, default=[512, 2048], metavar="N,N",
                     help="prompt lengths of the prefill figures (default 512,2048)")  # fmt: skip
    e2e.add_argument("--batches", type=_positive_ints, default=[1, 4, 16], metavar="N,N",
                     help="decode batch sizes (default 1,4,16)")  # fmt: skip
    e2e.add_argument("--prompt-tokens", type=_positive_int, default=128, help="decode prompts' length")
    e2e.add_argument("--output-tokens", type=_positive_int, default=128, help="decode outputs' length")
    e2e.add_argument("--context", type=_positive_int, default=0, metavar="TOKENS",
                     help="each engine's max_model_len (default: the longest prompt and output the bench runs; "
                     "32768 shows a 32k context's KV cache beside the model)")  # fmt: skip
    e2e.add_argument("--kv-cache-gib", type=_positive_int, default=0,
                     help="VLLM_CPU_KVCACHE_SPACE of each engine, whole GiB (default: what --context needs, at "
                     "least 1)")  # fmt: skip
    e2e.add_argument("--no-stock", action="store_true", help="skip stock vLLM's run")
    e2e.add_argument("--no-llama-cpp", action="store_true",
                     help="skip llama.cpp's run (its first run builds it and converts the checkpoint to GGUF)")  # fmt: skip
    e2e.add_argument("--rounds", type=_non_negative_int, default=2,
                     help="rounds of the batch-1 head-to-head after the full runs: our engine, then llama.cpp's "
                     "tg, alternating so that both meet the machine in the same state (default 2; 0: none)")  # fmt: skip
    e2e.add_argument("--blocks", type=_positive_int, default=3,
                     help="timed batch-1 decodes of ours, and llama-bench repetitions, per round (default 3)")  # fmt: skip
    e2e.add_argument("--only-head-to-head", action="store_true",
                     help="run the batch-1 head-to-head alone, without the full runs (needs llama.cpp)")  # fmt: skip
    e2e.set_defaults(handler=_bench_e2e, subparser=e2e)
    curves = bench_sub.add_parser(
        "curves",
        help="one engine's service curve against a running OpenAI endpoint: time per output token against "
        "concurrency, time to first token against prompt length, the engine's capacity (for `plan`)",
    )
    curves.add_argument("--url", required=True, help="the endpoint's base URL (a vLLM server, or the stack)")
    curves.add_argument("--model", help="the served model's name (default: the first /v1/models lists)")
    curves.add_argument("--effort", choices=["low", "medium", "high"],
                        help="through the stack: the effort whose pool is measured")  # fmt: skip
    curves.add_argument("--concurrency", type=_positive_ints, default=[1, 2, 4, 8], metavar="N,N",
                        help="sequences decoding at once (default 1,2,4,8)")  # fmt: skip
    curves.add_argument("--prompt-tokens", type=_positive_ints, default=[64, 256, 1024], metavar="N,N",
                        help="prompt lengths of the prefill points (default 64,256,1024)")  # fmt: skip
    curves.add_argument("--output-tokens", type=_positive_int, default=32,
                        help="tokens per decode request (default 32)")  # fmt: skip
    curves.add_argument("--max-num-seqs", type=_positive_int,
                        help="the engine's max_num_seqs (default: the highest --concurrency)")  # fmt: skip
    curves.add_argument("--kv-capacity-tokens", type=_positive_int,
                        help="its KV cache's tokens (default: from vLLM's /metrics)")  # fmt: skip
    curves.add_argument("--replicas", type=_positive_int, default=1,
                        help="replicas behind the endpoint (the --effort pool's): each is loaded alike, figures "
                        "per replica (default 1)")  # fmt: skip
    curves.add_argument("--json", metavar="FILE", help="also write the curve as JSON to FILE")
    curves.set_defaults(handler=_bench_curves, subparser=curves)
    routing = bench_sub.add_parser(
        "routing",
        help="effort pools vs one shared pool (same replicas, engines, model), one workload: TTFT per effort, "
        "throughput, goodput",
    )
    routing.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    routing.add_argument("--users", type=_positive_int, default=6, help="concurrent users (default 6)")
    routing.add_argument(
        "--duration", type=_duration, default=60.0, metavar="D", help="per arm (default 60s)"
    )
    routing.add_argument(
        "--report", metavar="DIR", help="keep each arm's load-test report and serve log here"
    )
    routing.add_argument("--curves", metavar="FILE",
                         help="also measure the shared pool's curve after its load test (bench curves, every "
                         "replica loaded alike) into FILE and the JSON, for plan validate")  # fmt: skip
    routing.set_defaults(handler=_bench_routing, subparser=routing)
    overhead = bench_sub.add_parser(
        "overhead",
        help="the stack's serving path vs vLLM's own OpenAI server on the same engine: latency, TTFT, "
        "tokens/s and CPU per request and per token outside the engine",
    )
    overhead.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    overhead.add_argument(
        "--concurrency",
        type=_positive_ints,
        metavar="N[,N]",
        help="clients (default 4,32; with --relay: streams, default 1,32,128,512)",
    )
    overhead.add_argument(
        "--rounds", type=_positive_int, default=2, help="rounds per target, alternating (default 2)"
    )
    overhead.add_argument(
        "--requests", type=_positive_int, default=64, help="non-streamed requests per round (default 64)"
    )
    overhead.add_argument(
        "--streams", type=_positive_int, default=32, help="streamed requests per round (default 32)"
    )
    overhead.add_argument(
        "--output-tokens", type=_positive_int, help="tokens per stream (default 64; with --relay 128)"
    )
    overhead.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded nano)")
    overhead.add_argument("--keep", metavar="DIR", help="keep both servers' logs and the stack config here")
    overhead.add_argument(
        "--idle-seconds",
        type=_non_negative_int,
        default=10,
        help="seconds both targets are measured up and unloaded (default 10; 0 skips it)",
    )
    overhead.add_argument(
        "--relay",
        action="store_true",
        help="instead: tokens/s one ingress replica relays from a synthetic pool (no engine), at 1, 32, 128 "
        "and 512 streams (or --concurrency), --output-tokens per stream (default 128)",
    )
    overhead.add_argument(
        "--direct-ingress",
        action="store_true",
        help="with --relay: clients reach the ingress replica directly (Ray Serve's experimental direct "
        "ingress, no proxy), to measure what the proxy hop costs",
    )
    overhead.set_defaults(handler=_bench_overhead, subparser=overhead)
    soak = bench_sub.add_parser(
        "soak",
        help="the embedded default under mixed hostile traffic (hang-ups, bad input, 429s) for a long time: "
        "RSS per process over time, leaked admission slots, lost requests",
    )
    soak.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    soak.add_argument("--duration", type=_duration, default=1800.0, metavar="D", help="default 30m")
    soak.add_argument("--users", type=_positive_int, default=6, help="concurrent clients (default 6)")
    soak.add_argument(
        "--sample-every", type=_duration, default=30.0, metavar="D", help="RSS sample period (default 30s)"
    )
    soak.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the traffic mix")
    soak.add_argument("--keep", metavar="DIR", help="keep the serve log and config here")
    soak.set_defaults(handler=_bench_soak, subparser=soak)
    lifecycle = bench_sub.add_parser(
        "lifecycle",
        help="on a multi-node Ray cluster built from the rendered chart (nano): deploy time, cold start, "
        "scale-up under a load step per autoscaling policy, scale-down, a redeploy and a node loss under "
        "streams; failed requests and cut streams in each",
    )
    lifecycle.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    lifecycle.add_argument(
        "--policies", type=_policies, default=("ongoing", "queue"),
        help="the fast pool's autoscaling policies to compare, in order (default ongoing,queue)",
    )  # fmt: skip
    lifecycle.add_argument(
        "--users", type=_positive_int, default=4, help="streams in the load step (default 4)"
    )
    lifecycle.add_argument(
        "--step", type=_duration, default=180.0, metavar="D", help="the load step's length (default 180s)"
    )
    lifecycle.add_argument(
        "--output-tokens", type=_positive_int, default=256, help="tokens per stream in the step (default 256)"
    )
    lifecycle.add_argument("--keep", metavar="DIR", help="keep the nodes' logs here")
    lifecycle.set_defaults(handler=_bench_lifecycle, subparser=lifecycle)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # A line per HTTP call would drown the commands' own progress (benches poll every half second).
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return args.handler(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
