"""The `ernie-serve` command.

Subcommands:
- `serve` (also what `ernie-serve --model X ...` without a subcommand means): the OpenAI-compatible server.
  FastDeploy's command lines from the model card run unchanged.
- `plugins`: every registered backend, scheduler and model architecture, where it comes from, and whether
  each backend can run on this machine; plugins that failed to load, with the reason.
- `generate`: offline generation with the `LLM` API, streaming text to stdout as it is produced.
- `bench serve`: a serving benchmark against a running server (vLLM's `bench serve`), or `--offline`.
- `bench throughput`: the offline engine against transformers' `generate`; `bench scheduler`: scheduler cost.
- `bench soak`: streaming clients with random aborts for a fixed time; fails unless the server came out whole.
- `export onnx`: write a checkpoint's model as an ONNX graph; `export tensorrt`: build its TensorRT engine.

Errors the user can fix (bad flag values, unknown backend, missing checkpoint) are one line on stderr and
a non-zero exit, never a traceback; argparse usage errors exit 2 as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from ernie_serve.cli_options import (
    PROG,
    FlagClashError,
    add_backend_arguments,
    add_settings_arguments,
    backend_option_errors,
    format_validation_error,
    given_settings,
    settings_from_args,
)
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.errors import UserError
from ernie_serve.logging import LOG_FORMATS, LOG_LEVELS, configure_logging

if TYPE_CHECKING:
    from ernie_serve.core.sampling_params import SamplingParams

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed (model missing, backend unavailable)
EXIT_USAGE = 2  # bad flags or values, as argparse uses

# Sampling flags of `generate` -> SamplingParams fields, used to name the flag in error messages.
_SAMPLING_FLAGS = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
}


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("ERNIE_SERVE_LOG_LEVEL", "info").lower(),
        help="log level (default: info; env ERNIE_SERVE_LOG_LEVEL)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; called by `main` (and by tests/docs that want the generated --help)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve and run Baidu ERNIE 4.5 models with swappable backends.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics). `ernie-serve --model PATH ...` without a subcommand means this. "
        "Options also read ERNIE_SERVE_* environment variables.",
    )
    serve.add_argument(
        "model_tag", nargs="?", metavar="MODEL", help="the model, as an alternative to --model (vLLM style)"
    )
    add_settings_arguments(serve.add_argument_group("engine options"), EngineSettings)
    add_settings_arguments(serve.add_argument_group("server options"), _server_settings_cls())
    _add_log_level(serve)
    add_backend_arguments(serve, {"engine option": EngineSettings, "server option": _server_settings_cls()})

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    _add_bench_serve(bench_sub)
    _add_bench_throughput(bench_sub)
    _add_bench_soak(bench_sub)
    scheduler_bench = bench_sub.add_parser(
        "scheduler",
        help="scheduler cost per step against the number of running requests",
        description="Time schedule() + update() (no model) with 1..512 requests decoding.",
    )
    _add_log_level(scheduler_bench)
    structured_bench = bench_sub.add_parser(
        "structured-output",
        help="decode step time with JSON-schema-constrained requests against free ones",
        description="Time engine decode steps of N concurrent requests on the CPU benchmark model, free and "
        "constrained to a JSON schema, taking turns; medians and their ratio (docs/structured_output.md).",
    )
    structured_bench.add_argument("--requests", type=int, default=16, help="concurrent requests (default: 16)")
    structured_bench.add_argument("--output-len", type=int, default=64, help="tokens per request (default: 64)")
    structured_bench.add_argument("--rounds", type=int, default=5, help="free/constrained pairs (default: 5)")
    structured_bench.add_argument("--model", default=None, help="checkpoint (default: the CPU benchmark model)")
    _add_log_level(structured_bench)
    quant_bench = bench_sub.add_parser(
        "quantization",
        help="--quantization's accuracy and memory (torch backend), or the low-bit kernels' speed",
        description="Teacher-forced top-1 agreement and mean KL of each quantized variant against float32 on the "
        "CPU benchmark model and the tiny shapes, and weight bytes against float32 (docs/quantization.md). "
        "With --kernels: every matmul kernel for float32, int8 and int4 weights, timed side by side.",
    )
    quant_bench.add_argument("--sequences", type=int, default=16, help="sequences per model (default: 16)")
    quant_bench.add_argument("--length", type=int, default=128, help="tokens per sequence (default: 128)")
    quant_bench.add_argument("--skip-tiny", action="store_true", help="the benchmark model only")
    quant_bench.add_argument("--kernels", action="store_true", help="time the matmul kernels instead")
    quant_bench.add_argument(
        "--trained",
        action="store_true",
        help="accuracy of a small MoE model trained here on held-out text instead (trained on first use, about "
        "ten minutes; needs transformers: pip install 'ernie-serve[test]')",
    )
    quant_bench.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    quant_bench.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: its quantized exports against its float32 one on the benchmark model, or with --kernels "
        "onnxruntime's quantized kernels (default: torch)",
    )
    _add_log_level(quant_bench)

    export = sub.add_parser("export", help="export a model for another runtime", description="Export a model.")
    export_sub = export.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    export_onnx = export_sub.add_parser(
        "onnx",
        help="write model.onnx + model.onnx.data, checked with onnx.checker",
        description="Export the ERNIE model of a checkpoint to ONNX (with KV cache inputs and outputs).",
    )
    export_onnx.add_argument("--model", required=True, help="checkpoint directory, 'demo', or a preset name")
    export_onnx.add_argument("--output", required=True, help="directory to write model.onnx and model.onnx.data")
    export_onnx.add_argument(
        "--load-format",
        choices=("auto", "safetensors", "dummy"),
        default="auto",
        help="dummy = random weights of the model's shape (default: auto)",
    )
    export_onnx.add_argument("--seed", type=int, default=0, help="seed for dummy weights (default: 0)")
    export_onnx.add_argument(
        "--quantization",
        choices=("wint8", "wint4"),
        default=None,
        help="store the projections quantized, as --backend onnx does with this flag (default: float32)",
    )
    export_onnx.add_argument(
        "--quantization-group-size",
        type=int,
        choices=(-1, 64, 128),
        default=128,
        help="wint4: input channels sharing a scale; -1 = one scale per output channel (default: 128)",
    )
    export_onnx.add_argument(
        "--no-quantize-lm-head",
        dest="quantize_lm_head",
        action="store_false",
        help="with --quantization: keep the LM head in float32",
    )
    _add_log_level(export_onnx)
    export_trt = export_sub.add_parser(
        "tensorrt",
        help="build a TensorRT engine into an engine cache directory (needs TensorRT and an NVIDIA GPU)",
        description="Build the TensorRT engine --backend tensorrt would build, into DIR; serve it with "
        "--tensorrt-cache-dir DIR and the same --dtype and batch/length limits.",
    )
    export_trt.add_argument("--model", required=True, help="checkpoint directory, 'demo', or a preset name")
    export_trt.add_argument("--output", required=True, help="the engine cache directory to build into")
    export_trt.add_argument("--load-format", choices=("auto", "safetensors", "dummy"), default="auto")
    export_trt.add_argument("--seed", type=int, default=0, help="seed for dummy weights (default: 0)")
    export_trt.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    for flag, default in (("--max-num-batched-tokens", 2048), ("--max-num-seqs", 64), ("--max-model-len", None)):
        export_trt.add_argument(flag, type=int, default=default, help=f"as for serving (default: {default})")
    _add_log_level(export_trt)

    plugins = sub.add_parser(
        "plugins",
        help="list registered backends, schedulers and models",
        description="List every registered backend, scheduler and model architecture, with the "
        "distribution that provides it and whether each backend can run on this machine.",
    )
    plugins.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    plugins.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("ERNIE_SERVE_LOG_FORMAT", "console"),
        help="log output format (default: console; env ERNIE_SERVE_LOG_FORMAT)",
    )
    _add_log_level(plugins)

    generate = sub.add_parser(
        "generate",
        help="generate text offline, streaming it to stdout",
        description="Generate a completion for each PROMPT, streaming text to stdout as it is produced. "
        "Engine options also read ERNIE_SERVE_* environment variables.",
    )
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text; '-' reads stdin")
    engine = generate.add_argument_group("engine options")
    # `--seed` and `--log-format` are EngineSettings fields, so they come from here: the engine seed is
    # also the default seed of requests, which is what `--seed` should mean for sampling too.
    add_settings_arguments(engine, EngineSettings)
    _add_log_level(generate)
    sampling = generate.add_argument_group("sampling options")
    sampling.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    sampling.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's, else 1.0)"
    )
    sampling.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus mass in (0, 1] (default: the checkpoint's, else 1.0)",
    )
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = off")
    sampling.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    add_backend_arguments(generate, {"engine option": EngineSettings})
    return parser


def _server_settings_cls() -> type:
    from ernie_serve.gateway.settings import ServerSettings

    return ServerSettings


def _add_bench_throughput(bench_sub: Any) -> None:
    bench = bench_sub.add_parser(
        "throughput",
        help="offline engine (one or more backends) vs transformers generate, same weights and workload, one run",
        description="Run a workload (by default mixed: prompts 16..256, outputs 16..128 tokens; or fixed lengths "
        "with --input-len/--output-len; greedy, ignore_eos) through ernie-serve's offline engine on each --backend "
        "and through transformers' generate (static batches of 16, left padding) on the same weights, and print "
        "a table (throughput, start-up, mean TTFT and TPOT, KV blocks) and the ratios. Needs transformers (the "
        "test extra) unless --skip-transformers.",
    )
    bench.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, 'demo', or a preset with --load-format dummy (default: the ~70M CPU "
        "benchmark model)",
    )
    bench.add_argument(
        "--num-requests", "--num-prompts", type=int, default=48, help="requests in the workload (default: 48)"
    )
    bench.add_argument("--input-len", type=int, default=None, help="fixed prompt length (with --output-len)")
    bench.add_argument("--output-len", type=int, default=None, help="fixed output length (with --input-len)")
    bench.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    bench.add_argument("--max-num-seqs", type=int, default=64, help="engine --max-num-seqs (default: 64)")
    bench.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="engine --max-num-batched-tokens (default: 2048)"
    )
    bench.add_argument(
        "--backend",
        default="torch",
        help="the backend ernie-serve runs the model with; several, comma-separated, are compared in one run "
        "(default: torch)",
    )
    bench.add_argument("--dtype", default=None, help="engine --dtype (default: the engine's, auto)")
    bench.add_argument("--device", default=None, help="engine --device (default: the engine's, auto)")
    bench.add_argument(
        "--load-format",
        choices=("auto", "safetensors", "dummy"),
        default=None,
        help="engine --load-format; dummy = random weights, needed for presets (default: auto)",
    )
    bench.add_argument(
        "--quantization",
        default="none",
        help="engine --quantization; several, comma-separated ('none' for full precision), each a system of every "
        "backend, compared in one run, e.g. none,wint8,wint4 (default: none)",
    )
    bench.add_argument(
        "--rounds", type=int, default=1, help="runs of the workload per system, taking turns; medians (default: 1)"
    )
    bench.add_argument(
        "--decode-repeats",
        type=int,
        default=5,
        help="single-request decode passes per backend on a fresh engine after one warm-up pass, median; 0 skips "
        "(default: 5)",
    )
    bench.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    bench.add_argument(
        "--bandwidth-bound",
        action="store_true",
        help="before each single-request decode pass, measure the machine's read bandwidth (a 1 GiB float32 sum); "
        "print the weight bytes a decode step reads and the fraction of that bound the decode reaches",
    )
    bench.add_argument("--skip-transformers", action="store_true", help="time ernie-serve only")
    bench.add_argument("--profile", action="store_true", help="also report where the engine's time goes")
    bench.add_argument("--output-json", default=None, help="write the results to this JSON file")
    _add_log_level(bench)


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from ernie_serve.bench.throughput import ThroughputConfig
    from ernie_serve.bench.throughput import main as throughput_main

    configure_logging("console", args.log_level)
    given = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    for name in ("dtype", "device", "load_format"):  # unset: the engine's own default applies
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    try:  # the engine's own flags, checked before anything is built, naming the flag
        EngineSettings(**given)
    except ValidationError as exc:
        for line in format_validation_error(exc, EngineSettings, given):
            sys.stderr.write(line + "\n")
        return EXIT_USAGE
    try:
        config = ThroughputConfig(
            model=args.model,
            backends=tuple(b.strip() for b in args.backend.split(",") if b.strip()),
            quantizations=tuple(None if q.strip() == "none" else q.strip() for q in args.quantization.split(",")),
            num_requests=args.num_requests,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=args.seed,
            rounds=args.rounds,
            decode_repeats=args.decode_repeats,
            compare_transformers=not args.skip_transformers,
            profile=args.profile,
            threads=args.threads,
            bandwidth_bound=args.bandwidth_bound,
            engine_settings=given,
        )
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if config.compare_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            _error("bench throughput compares against transformers: pip install 'ernie-serve[test]'")
            return EXIT_FAILURE
    try:
        return throughput_main(config, args.output_json)
    except UserError as exc:
        _error(str(exc))
        return EXIT_FAILURE


def _add_random_prompt_flags(parser: Any, input_len: int, output_len: int, range_ratio: float, seed_of: str) -> None:
    """The random-prompt flags `bench serve` and `bench soak` share (vLLM's names), with their defaults."""
    parser.add_argument("--random-input-len", type=int, default=input_len, help="prompt tokens (default: %(default)s)")
    parser.add_argument(
        "--random-output-len", type=int, default=output_len, help="tokens to generate (default: %(default)s)"
    )
    parser.add_argument(
        "--random-range-ratio", type=float, default=range_ratio, help="length spread, in [0, 1) (default: %(default)s)"
    )
    parser.add_argument(
        "--random-vocab-size",
        type=int,
        default=1000,
        help="prompt token ids are drawn from [10, this) (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {seed_of} (default: %(default)s)")


def _add_api_key_flag(parser: Any) -> None:
    parser.add_argument(
        "--api-key",
        default=os.environ.get("ERNIE_SERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer key (default: env ERNIE_SERVE_API_KEY or OPENAI_API_KEY)",
    )


def _add_bench_serve(bench_sub: Any) -> None:
    bench = bench_sub.add_parser(
        "serve",
        help="benchmark a running server (or the offline engine) on random prompts",
        description="Send random prompts to a running server's /v1/completions as streams and report "
        "throughput, TTFT, TPOT and ITL (like vLLM's `bench serve`). With --offline, run the same requests "
        "through the in-process engine instead, to see what the HTTP layer costs.",
    )
    bench.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    bench.add_argument("--endpoint", default="/v1/completions", help="API path (default: %(default)s)")
    bench.add_argument(
        "--model", default=None, help="model name in the requests (default: none); with --offline, the checkpoint"
    )
    bench.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)")
    bench.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: all at once)"
    )
    bench.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    _add_random_prompt_flags(bench, input_len=256, output_len=128, range_ratio=0.0, seed_of="the random prompts")
    bench.add_argument("--ignore-eos", action="store_true", help="generate exactly --random-output-len tokens")
    _add_api_key_flag(bench)
    bench.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    bench.add_argument("--offline", action="store_true", help="run the requests in-process, without HTTP")
    bench.add_argument("--save-result", action="store_true", help="write the results as JSON")
    bench.add_argument("--result-dir", default=".", help="where --save-result writes (default: %(default)s)")
    bench.add_argument("--result-filename", default=None, help="file name for --save-result")
    _add_log_level(bench)


def _argv_with_default_command(argv: Sequence[str]) -> list[str]:
    """`ernie-serve --model X ...` (FastDeploy's command line after the module name) means `serve`."""
    argv = list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return ["serve", *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ernie-serve` console script; returns the process exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # `ernie-serve plugins | head`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not print a second BrokenPipeError, and exit quietly (Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
    except FlagClashError as exc:  # two plugins' backend options (or one and ours) want the same flag
        _error(str(exc))
        return EXIT_FAILURE
    args = parser.parse_args(_argv_with_default_command(sys.argv[1:] if argv is None else argv))
    if args.command == "plugins":
        try:
            configure_logging(args.log_format, args.log_level)
        except ValueError as exc:  # a bad ERNIE_SERVE_LOG_FORMAT (argparse does not check env defaults)
            _error(str(exc))
            return EXIT_USAGE
        return _cmd_plugins(args, sys.stdout)
    if args.command == "generate":
        return _cmd_generate(args)
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "bench":
        if args.bench_command == "throughput":
            return _cmd_bench_throughput(args)
        if args.bench_command == "scheduler":
            from ernie_serve.bench.scheduler import main as scheduler_main

            return scheduler_main()
        if args.bench_command == "soak":
            return _cmd_bench_soak(args)
        if args.bench_command == "structured-output":
            configure_logging("console", args.log_level)
            from ernie_serve.bench.structured_output import main as structured_main

            return structured_main(args.requests, args.output_len, args.rounds, args.model)
        if args.bench_command == "quantization":
            configure_logging("console", args.log_level)
            if args.trained:
                from ernie_serve.testing.trained import trained_checkpoint

                try:
                    trained_checkpoint()  # trained on first use, by transformers
                except ImportError as missing:
                    _error(str(missing))
                    return EXIT_FAILURE
            if args.backend == "onnx":
                from ernie_serve.backends.onnx.quant_bench import main as onnx_quantization_main

                return onnx_quantization_main(
                    kernels=args.kernels,
                    num_sequences=args.sequences,
                    length=args.length,
                    threads=args.threads,
                    trained=args.trained,
                )
            from ernie_serve.bench.quantization import main as quantization_main

            return quantization_main(
                num_sequences=args.sequences,
                length=args.length,
                include_tiny=not args.skip_tiny,
                kernels=args.kernels,
                threads=args.threads,
                trained=args.trained,
            )
        return _cmd_bench_serve(args)
    if args.command == "export":
        configure_logging("console", args.log_level)
        if args.export_format == "tensorrt":
            from ernie_serve.backends.tensorrt.export import export_command as tensorrt_export

            return tensorrt_export(
                args.model,
                args.output,
                args.load_format,
                args.seed,
                args.dtype,
                args.max_num_batched_tokens,
                args.max_num_seqs,
                args.max_model_len,
            )
        try:  # the exporter needs the onnx extra; the rest of the CLI must not
            from ernie_serve.backends.onnx.export import export_command
        except ImportError as missing:
            _error(f"export onnx needs {missing.name or 'onnx'}: pip install 'ernie-serve[onnx]'")
            return EXIT_FAILURE
        return export_command(
            args.model,
            args.output,
            load_format=args.load_format,
            seed=args.seed,
            quantization=args.quantization,
            quantization_group_size=args.quantization_group_size,
            quantize_lm_head=args.quantize_lm_head,
        )
    parser.error(f"unknown command {args.command!r}")  # unreachable: subparsers are required
    return EXIT_USAGE


# --- plugins -------------------------------------------------------------------------------------------


def _cmd_plugins(args: argparse.Namespace, out: TextIO) -> int:
    from ernie_serve.core.plugins import registry
    from ernie_serve.plugin_report import plugins_json, write_report

    reg = registry()
    if args.json:
        json.dump(plugins_json(reg), out, indent=2)
        out.write("\n")
    else:
        write_report(reg, out)
    return EXIT_OK


# --- generate ------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")


def _sampling_params(args: argparse.Namespace, settings: EngineSettings, seed_given: bool) -> SamplingParams:
    from ernie_serve.core.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        # Only an explicit --seed pins each request's generator; otherwise the engine's default applies.
        seed=settings.seed if seed_given else None,
    )


def _read_prompts(prompts: Sequence[str]) -> list[str]:
    return [sys.stdin.read() if p == "-" else p for p in prompts]


def _torchrun_worker() -> bool:
    """Whether torchrun started this process as a rank above 0: it then serves rank 0 instead of the command."""
    return int(os.environ.get("RANK", "0")) > 0 and "WORLD_SIZE" in os.environ


def _serve_torchrun_worker(settings: EngineSettings) -> int:
    from ernie_serve.backends.torch.distributed import serve_torchrun_worker

    try:
        return serve_torchrun_worker(settings)
    except UserError as exc:
        _error(str(exc))
        return EXIT_FAILURE


def _cmd_generate(args: argparse.Namespace) -> int:
    from ernie_serve.core.sampling_params import SamplingParamsError

    given = given_settings(args, EngineSettings)
    try:
        settings = settings_from_args(args, EngineSettings)
    except ValidationError as exc:
        for line in format_validation_error(exc, EngineSettings, given):
            sys.stderr.write(line + "\n")
        return EXIT_USAGE
    assert isinstance(settings, EngineSettings)
    option_errors = backend_option_errors(settings.backend, settings.backend_options)
    if option_errors:
        sys.stderr.write("\n".join(option_errors) + "\n")
        return EXIT_USAGE
    try:
        params = _sampling_params(args, settings, seed_given="seed" in given)
    except SamplingParamsError as exc:
        _error(f"{_SAMPLING_FLAGS.get(exc.param, exc.param)}: {exc}")
        return EXIT_USAGE
    configure_logging(settings.log_format, args.log_level)
    if _torchrun_worker():
        return _serve_torchrun_worker(settings)
    prompts = _read_prompts(args.prompts)

    from ernie_serve.llm import LLM

    out = sys.stdout
    llm: LLM | None = None
    try:
        llm = LLM.from_settings(settings)
        for i, prompt in enumerate(prompts):
            if i:
                out.write("\n")  # a blank line between completions of several prompts
            for delta in llm.stream(prompt, params, chat=args.chat):
                out.write(delta)
                out.flush()  # stream: show each piece as soon as it is decoded
            out.write("\n")
            out.flush()
    except UserError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        out.write("\n")
        return 130  # the shell convention for SIGINT
    finally:
        if llm is not None:  # release the backend (threads, device memory) even on errors
            llm.close()
    return EXIT_OK


# --- serve ---------------------------------------------------------------------------------------------


# A server's compute threads share the CPU with the event loop and often with other processes. OpenMP's
# default busy-waiting then stalls every parallel region whose partner thread lost its core: measured on a
# 2-core machine under load (docs/gateway.md), 9 output tok/s spinning vs 120 sleeping. Read by the OpenMP
# runtime when torch loads it, so it is set before the engine is imported; a user's own value wins.
_SERVER_OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _cmd_serve(args: argparse.Namespace) -> int:
    for name, value in _SERVER_OMP_ENV.items():
        os.environ.setdefault(name, value)
    from ernie_serve.gateway.settings import ServerSettings, inert_option_notes

    given_engine = given_settings(args, EngineSettings)
    given_server = given_settings(args, ServerSettings)
    if args.model_tag is not None:
        if "model" in given_engine and given_engine["model"] != args.model_tag:
            _error(f"the model is given twice: {args.model_tag!r} and --model {given_engine['model']!r}")
            return EXIT_USAGE
        given_engine["model"] = args.model_tag
    lines: list[str] = []
    try:
        engine_settings = EngineSettings(**given_engine)
        lines += backend_option_errors(engine_settings.backend, engine_settings.backend_options)
    except ValidationError as exc:
        lines += format_validation_error(exc, EngineSettings, given_engine)
    try:
        server_settings = ServerSettings(**given_server)
    except ValidationError as exc:
        lines += format_validation_error(exc, ServerSettings, given_server)
    if lines:
        for line in lines:
            sys.stderr.write(line + "\n")
        return EXIT_USAGE
    configure_logging(engine_settings.log_format, args.log_level)
    if _torchrun_worker():
        return _serve_torchrun_worker(engine_settings)

    import structlog

    from ernie_serve.core.plugins import UnknownPluginError, get_backend_class, get_scheduler_class
    from ernie_serve.gateway.chat_plan import ServerParsers
    from ernie_serve.gateway.server import ServerStartError, run

    log = structlog.get_logger("ernie_serve.cli")
    try:  # fail before binding ports and loading weights when a plugin name is unknown, or cannot run here
        unavailable = get_backend_class(engine_settings.backend).availability()
        get_scheduler_class(engine_settings.scheduler)
        ServerParsers.from_settings(server_settings)
    except UnknownPluginError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if unavailable:
        _error(f"backend {engine_settings.backend!r} cannot run here: {unavailable}")
        return EXIT_FAILURE
    for note in inert_option_notes(server_settings):
        log.warning(note)
    try:
        result = run(engine_settings, server_settings)
    except ServerStartError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if result.error is not None:
        if isinstance(result.error, UserError):
            _error(str(result.error))
        else:  # a bug: show where it happened
            traceback.print_exception(result.error, file=sys.stderr)
        return EXIT_FAILURE
    return result.exit_code


# --- bench ---------------------------------------------------------------------------------------------


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio
    import time
    from pathlib import Path

    from ernie_serve.bench import serve as bench
    from ernie_serve.bench.workload import random_requests

    configure_logging("console", args.log_level)
    for flag, value in (("--num-prompts", args.num_prompts), ("--max-concurrency", args.max_concurrency)):
        if value is not None and value < 1:
            _error(f"{flag} must be at least 1")
            return EXIT_USAGE
    if args.random_input_len < 1 or args.random_output_len < 1:
        _error("--random-input-len and --random-output-len must be at least 1")
        return EXIT_USAGE
    try:
        requests = random_requests(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.random_vocab_size,
            args.seed,
        )
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    config = {k: v for k, v in vars(args).items() if k not in ("command", "bench_command", "api_key", "log_level")}
    if args.offline:
        try:
            settings = EngineSettings(**({"model": args.model} if args.model else {}))
            results, duration = bench.run_offline(
                settings, requests, max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos
            )
        except (ValidationError, UserError) as exc:
            _error(str(exc).splitlines()[0])
            return EXIT_FAILURE
        title = "Offline Engine Benchmark Result"
    else:
        results, duration = asyncio.run(
            bench.run_http(
                args.base_url,
                requests,
                model=args.model,
                endpoint=args.endpoint,
                max_concurrency=args.max_concurrency,
                request_rate=args.request_rate,
                ignore_eos=args.ignore_eos,
                api_key=args.api_key,
                seed=args.seed,
                timeout=args.timeout,
            )
        )
        title = "Serving Benchmark Result"
    summary = bench.summarize(results, duration)
    sys.stdout.write(bench.format_report(summary, title) + "\n")
    if args.save_result:
        name = (
            args.result_filename
            or f"bench-{'offline' if args.offline else 'serve'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        config["request_rate"] = str(config["request_rate"])  # inf is not JSON
        path.write_text(json.dumps(bench.result_document(summary, config, results), indent=2) + "\n")
        sys.stdout.write(f"results written to {path}\n")
    return EXIT_OK if summary["completed"] else EXIT_FAILURE


# --- bench soak ----------------------------------------------------------------------------------------


def _add_bench_soak(bench_sub: Any) -> None:
    bench = bench_sub.add_parser(
        "soak",
        help="streaming clients with random aborts for a fixed time; checks failures, RSS and KV usage",
        description="Start `ernie-serve serve --model MODEL` (or use a running server: --base-url, with "
        "--server-pid for RSS), drive it with --concurrency streaming clients for --minutes, closing a random "
        "--abort-fraction of the streams early, and report failed requests, server RSS over time, KV usage at "
        "the end and latency percentiles. Exits 1 unless no request failed, RSS grew less than "
        "--max-rss-growth percent after the warm-up, and KV usage is back to 0.",
    )
    target = bench.add_argument_group("server")
    target.add_argument("--model", default=None, help="start `ernie-serve serve` on this checkpoint (or demo)")
    target.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the started server, repeatable (e.g. --server-arg=--max-num-seqs=64)",
    )
    target.add_argument("--server-log", default=None, help="the started server's log file (default: a temp file)")
    target.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="a running server, without --model (default: %(default)s)"
    )
    target.add_argument("--server-pid", type=int, default=None, help="the running server's pid, for its RSS")
    _add_api_key_flag(target)
    bench.add_argument("--minutes", type=float, default=30.0, help="how long clients send (default: %(default)s)")
    bench.add_argument("--concurrency", type=int, default=32, help="streaming clients (default: %(default)s)")
    bench.add_argument(
        "--abort-fraction", type=float, default=0.1, help="share of streams closed early (default: %(default)s)"
    )
    bench.add_argument(
        "--warmup-minutes", type=float, default=None, help="RSS growth counts from here (default: 20%%, at most 5)"
    )
    bench.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="instead: RSS growth counts once this many requests finished, over at least as many more",
    )
    bench.add_argument(
        "--sample-interval", type=float, default=None, help="seconds between RSS samples (default: about 60 samples)"
    )
    _add_random_prompt_flags(bench, input_len=128, output_len=64, range_ratio=0.5, seed_of="the clients' choices")
    bench.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for data (default: %(default)s)")
    bench.add_argument(
        "--idle-timeout", type=float, default=60.0, help="seconds to wait for an idle server (default: %(default)s)"
    )
    bench.add_argument(
        "--max-rss-growth", type=float, default=10.0, help="RSS growth limit in percent (default: %(default)s)"
    )
    bench.add_argument("--output-json", default=None, help="write the full report, every sample included")
    _add_log_level(bench)


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from ernie_serve.bench import soak

    configure_logging("console", args.log_level)
    try:
        config = soak.SoakConfig(
            minutes=args.minutes,
            concurrency=args.concurrency,
            abort_fraction=args.abort_fraction,
            warmup_minutes=args.warmup_minutes,
            warmup_requests=args.warmup_requests,
            sample_interval=args.sample_interval,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            vocab_size=args.random_vocab_size,
            seed=args.seed,
            timeout=args.timeout,
            idle_timeout=args.idle_timeout,
            max_rss_growth_pct=args.max_rss_growth,
            api_key=args.api_key,
        )
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        return soak.main(
            config,
            model=args.model,
            server_args=args.server_arg,
            base_url=args.base_url,
            server_pid=args.server_pid,
            output_json=args.output_json,
            server_log=args.server_log,
        )
    except UserError as exc:
        _error(str(exc))
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
