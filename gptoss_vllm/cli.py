"""The ``gptoss-vllm`` command: one entry point for building checkpoints, converting them and serving.

Bad arguments exit with code 2 and a message naming the argument; runtime failures exit with code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("gptoss_vllm")


def _make_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.checkpoints.config import ConfigError, parse_override
    from gptoss_vllm.checkpoints.presets import TRAINED_PRESETS, build_preset

    if args.preset in TRAINED_PRESETS and args.seed is not None:
        parser.error(f"--seed: the {args.preset} preset is trained weights; a seed does not apply")
    try:
        overrides = dict(parse_override(item) for item in args.set)
        out = build_preset(args.preset, args.out, args.seed or 0, args.dtype, args.force, overrides)
    except ConfigError as exc:
        parser.error(f"{'--set' if args.set else '--preset'}: {exc}")
    except FileExistsError as exc:
        parser.error(f"--out: {exc}")
    origin = "trained weights" if args.preset in TRAINED_PRESETS else f"seed {args.seed or 0}"
    print(f"wrote {args.dtype} gpt-oss checkpoint ({args.preset}, {origin}) to {out}")
    return 0


def _quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.quant.convert import CheckpointError, quantize_checkpoint

    try:
        out = quantize_checkpoint(args.src, args.dst)
    except (CheckpointError, FileExistsError) as exc:
        parser.error(str(exc))
    print(f"wrote MXFP4 checkpoint to {out}")
    return 0


def _bench_moe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.bench.moe import format_table, run_bench

    if args.json:
        try:
            with open(args.json, "a"):
                pass
        except OSError as exc:
            parser.error(f"--json: cannot write {args.json}: {exc.strerror}")
    report = run_bench(args.json, seed=args.seed)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.serve.config import ConfigError, load_config
    from gptoss_vllm.serve.launcher import Listen, port_is_free, run

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        parser.error(f"--config: {exc}")
    listen = Listen(args.host, args.port)
    if args.address is None and not port_is_free(listen):
        parser.error(f"--port: {args.host}:{args.port} is already in use; choose another port")
    return run(config, listen, args.address, args.ready_timeout)


def _train_nano(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gptoss_vllm.nano.evaluate import evaluate_weights, format_table
    from gptoss_vllm.nano.train import TrainSettings, asset_tensors, save_asset, train

    out = Path(args.out)
    if out.exists() and not args.force:
        parser.error(f"--out: {out} exists; pass --force to replace it")
    recipe = {"steps": args.steps, "batch_size": args.batch_size}
    settings = TrainSettings(seed=args.seed, **{k: v for k, v in recipe.items() if v is not None})
    result = train(settings)
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
    print(f"trained in {result.seconds:.0f} s; wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1..65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
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
    sv.set_defaults(handler=_serve, subparser=sv)

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    moe = bench_sub.add_parser(
        "moe",
        help="one gpt-oss-20b MoE layer: the CPU kernel vs the reference vs vLLM's bf16 MoE, M = 1..512",
    )
    moe.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    moe.add_argument("--seed", type=_non_negative_int, default=0, help="weights and routing seed")
    moe.set_defaults(handler=_bench_moe, subparser=moe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.handler(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
