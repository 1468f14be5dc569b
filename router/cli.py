"""``supernet-router``: the command line.

Exit codes: 0 ok, 1 a bug (traceback), 2 bad usage or input (one line on
stderr), 3 a checkpoint or table that does not match.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from policies.errors import InvalidRequest, SupernetError
from policies.jsonl import jsonl_objects
from router import bench_cli, toolkit_cli, train_cli

log = logging.getLogger("supernet_router")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except SupernetError as exc:
        print(f"supernet-router: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supernet-router", description="Serve and tune supernet LLMs: one checkpoint, a placement per request.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    checkpoint = commands.add_parser("checkpoint", help="make or locate checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="KIND")
    tiny = checkpoint_commands.add_parser("tiny", help="a small random-weight supernet in the Apriel2 layout")
    tiny.add_argument("--out", required=True, type=Path, help="folder to write config.json, safetensors, tokenizer")
    tiny.add_argument("--layers", type=int, default=6, help="decoder layers (default 6)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.add_argument("--window", type=int, default=16, help="sliding-window size (default 16, so short tests cross it)")
    tiny.set_defaults(run=run_checkpoint_tiny)
    path = checkpoint_commands.add_parser("path", help="print the folder of the embedded default checkpoint")
    path.set_defaults(run=run_checkpoint_path)

    generate = commands.add_parser("generate", help="generate text with one placement per request")
    generate.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--requests", type=Path,
                        help='JSONL file, one {"prompt", "placement", "max_tokens"} per line, run as one mixed batch')
    generate.add_argument("--placement", help="placement code (AASGKG) or mixer names; default: the checkpoint's main mixers")
    generate.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    generate.add_argument("--json", action="store_true", help="print JSON: {placement, tokens, text} per request")
    generate.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow reference)")
    generate.add_argument("--draft", help="speculate: this placement drafts tokens that --placement verifies "
                                          "(same output; runs on the serving engine)")
    generate.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per verify step (default 4)")
    generate.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA")
    generate.set_defaults(run=run_generate)

    serve = commands.add_parser("serve", help="start a local Ray and serve the OpenAI-compatible API")
    serve.add_argument("--config", type=Path, help="YAML configuration (default: the embedded small checkpoint)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--metrics-port", type=int, default=8080,
                       help="Ray's metrics export port, Prometheus text at /metrics (default 8080, KubeRay's)")
    serve.set_defaults(run=run_serve)

    toolkit_cli.register(commands)  # profile, evaluate, fit, frontier
    bench_cli.register(commands)  # bench engine
    train_cli.register(commands)  # train teacher, train supernet
    return parser


def run_checkpoint_tiny(args) -> int:
    from workers.model.tiny import make_tiny_checkpoint

    if args.layers < 1:
        raise InvalidRequest(f"--layers must be at least 1, got {args.layers}")
    if args.window < 1:
        raise InvalidRequest(f"--window must be at least 1, got {args.window}")
    out = make_tiny_checkpoint(args.out, num_layers=args.layers, seed=args.seed, window_size=args.window)
    print(out)
    return 0


def run_checkpoint_path(args) -> int:
    from router.defaults import default_checkpoint

    print(default_checkpoint())
    return 0


def run_generate(args) -> int:
    import torch

    from policies.speculation import check_draft_tokens
    from workers.generate import GenerationRequest, generate, generate_speculative
    from workers.model.loader import load_checkpoint
    from workers.model.tokenizer import Tokenizer
    from workers.sampling import SamplingParams

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
    tokenizer = Tokenizer.load(args.checkpoint)

    def params(max_tokens) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)

    def placement(spec):
        return model.config.placement(spec) if spec is not None else model.config.main_placement

    if args.prompt is not None:
        requests = [GenerationRequest(tokenizer.encode(args.prompt), placement(args.placement), params(args.max_tokens))]
    else:
        requests = [GenerationRequest(tokenizer.encode(line["prompt"]), placement(line.get("placement", args.placement)),
                                      params(line.get("max_tokens", args.max_tokens)))
                    for line in read_requests(args.requests)]
    if args.draft is None:
        results = generate(model, requests, use_cache=not args.no_cache, eos_token_id=tokenizer.eos_token_id)
    else:
        if args.no_cache:
            raise InvalidRequest("--draft runs on the engine's caches; it cannot be combined with --no-cache")
        check_draft_tokens(args.draft_tokens)
        draft = placement(args.draft)
        results = generate_speculative(model, requests, draft, args.draft_tokens, tokenizer.eos_token_id)
    for request, result in zip(requests, results):
        text = tokenizer.decode(result.tokens)
        if args.json:
            line = {"placement": request.placement.code, "tokens": result.tokens, "text": text}
            if args.draft is not None:
                line.update(draft=draft.code, draft_tokens=args.draft_tokens, drafted=result.drafted,
                            accepted=result.accepted, verify_steps=result.verifies)
            print(json.dumps(line))
        else:
            print(f"[{request.placement.code}] {text}")
    if args.draft is not None and not args.json:
        drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
        steps = sum(r.verifies for r in results)
        rate = f"{accepted / drafted:.1%}" if drafted else "n/a"
        print(f"draft {draft.code}: {accepted}/{drafted} drafted tokens accepted ({rate}), "
              f"{(accepted + steps) / max(steps, 1):.2f} tokens per verify step", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    import time

    from router.config import AppConfig
    from router.defaults import default_config
    from router.local_ray import local_ray_environment

    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        require_free_port(flag, args.host, port)
    config = AppConfig.from_yaml(args.config) if args.config else default_config()
    local_ray_environment()
    import ray
    from ray import serve

    from router.app import build_app

    # The ingress serves HTTP itself (router/http_server.py): no Serve HTTP proxy on the token path.
    app = build_app(config, listen=(args.host, args.port))  # resolves (first run: makes) the checkpoint
    ray.init(include_dashboard=False, log_to_driver=False, _metrics_export_port=args.metrics_port)
    serve.start(proxy_location="Disabled")
    serve_log = logging.getLogger("ray.serve")
    level = serve_log.level
    serve_log.setLevel(logging.WARNING)  # Serve's "ready at" line names its (disabled) proxy's port, not ours
    try:
        serve.run(app, name="supernet-router", route_prefix="/")
    finally:
        serve_log.setLevel(level)
    url = f"http://{args.host}:{args.port}"
    print(f"supernet-router is serving at {url}  (Ctrl-C stops it)")
    print(f"metrics (Prometheus text): {url}/metrics (the supernet_* series, as the dashboards name them); "
          f"every Ray series: http://{args.host}:{args.metrics_port}/metrics (ray_ prefix)")
    print("try a request with a latency budget:")
    print(f"  curl -s {url}/v1/completions -H 'content-type: application/json' -H 'x-slo-ttft-ms: 500' \\\n"
          f"    -d '{{\"model\": \"{config.ingress.model_name or Path(config.model.checkpoint).name}\", "
          f"\"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32, \"sla\": {{\"tpot_ms\": 100}}}}'")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def require_free_port(flag: str, host: str, port: int) -> None:
    import socket

    if not 0 < port < 65536:
        raise InvalidRequest(f"{flag} must be in 1..65535, got {port}")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidRequest(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror}): "
                                 f"choose another with {flag}") from None


def read_requests(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidRequest(f"{path}: cannot read ({exc.strerror})") from None
    requests = []
    for number, entry in jsonl_objects(path, text, "prompt"):
        max_tokens = entry.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise InvalidRequest(f"{path}:{number}: max_tokens must be a positive integer, got {max_tokens!r}")
        requests.append(entry)
    if not requests:
        raise InvalidRequest(f"{path}: no requests in the file")
    return requests


if __name__ == "__main__":
    sys.exit(main())
