"""``lmforge serve RUN``: declare the command, check its security switches, run uvicorn, shut down gracefully.

On SIGTERM (or the first Ctrl-C) the server stops taking work: new requests get a 503 OpenAI error while
the ones in flight finish, then uvicorn exits, the engine drains, and the process exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.serving.security import API_KEYS_ENV, LOCAL_HOST_NAMES, is_loopback, load_api_keys
from lmforge.serving.settings import ServeSettings

DESCRIPTION = """Serve a run's model over an OpenAI-compatible HTTP API, with the chat page at /.

Routes: POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, POST /v1/feedback,
GET /health, GET /metrics (Prometheus). Every route but /health and the chat page needs
`Authorization: Bearer <key>`, with keys from --api-key-file and/or the LMFORGE_API_KEYS environment variable.
The model is the run's chat fine-tuned checkpoint when it has one, else its pretrained one."""

EXAMPLES = """examples:
  echo "$(openssl rand -hex 24)" > keys.txt
  lmforge serve runs/default --api-key-file keys.txt           # http://127.0.0.1:8000/
  LMFORGE_API_KEYS=k1,k2 lmforge serve runs/default --port 9000
  lmforge serve runs/default --no-auth                         # this machine only"""


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Declare ``lmforge serve`` on the CLI's subparsers; ``run_serve`` runs it."""
    defaults = ServeSettings()
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
                                   description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder (its fine-tuned chat model if it has one) or checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only); another address needs API keys")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help=f"file of API keys, one per line (# comments allowed); also read: ${API_KEYS_ENV}=k1,k2")
    parser.add_argument("--no-auth", action="store_true",
                        help="accept requests without a key; only on a loopback --host (unless --insecure-bind)")
    parser.add_argument("--insecure-bind", action="store_true",
                        help="allow --no-auth on a non-loopback --host: anyone who can reach the port can use the model")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, metavar="N",
                        help=f"sequences the engine decodes together (default {defaults.max_batch_size})")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, metavar="N",
                        help=f"generations waiting or running at once; more get 429 at once (default {defaults.max_queue})")
    parser.add_argument("--rate-limit", type=float, default=defaults.rate_limit_per_minute, metavar="REQ_PER_MIN",
                        help=f"requests per minute per API key, in bursts up to the same number; 0: no limit "
                             f"(default {defaults.rate_limit_per_minute:g})")
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit, metavar="N",
                        help=f"largest max_tokens a request may ask for (default {defaults.max_tokens_limit}; the model's context "
                             "bounds prompt plus completion too)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                        help="longest prompt in tokens (default: the model's context)")
    parser.add_argument("--max-n", type=int, default=defaults.max_n, metavar="N",
                        help=f"most completions (n) per request (default {defaults.max_n})")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, metavar="BYTES",
                        help=f"largest request body; larger ones get 413 unread (default {defaults.max_body_bytes})")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout, metavar="SECONDS",
                        help=f"time for a whole request, stream included; then 504 and the generation is cancelled "
                             f"(default {defaults.request_timeout:g})")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin (e.g. https://app.example.com) allowed to call the API (repeatable; default: "
                             "none, CORS off)")
    parser.add_argument("--cache-size", type=int, default=defaults.cache_size, metavar="N",
                        help=f"responses to identical temperature-0 requests kept in memory; 0: no cache (default {defaults.cache_size})")
    parser.add_argument("--feedback-file", type=Path, default=None, metavar="FILE",
                        help="where the chat page's ratings are appended as JSON lines (default: RUN/feedback/feedback.jsonl)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the one-stream decode step with torch.compile at start (a few seconds; needs a C++ "
                             "compiler on CPU; ~1.3x faster single-stream decoding there, see BENCHMARKS.md)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for the model (default: all cores but one, which is left to the HTTP server; "
                             "OMP_NUM_THREADS, when set, wins)")
    return parser


def settings_from_args(args: argparse.Namespace, environ=None) -> ServeSettings:
    """Check the flags (a mistake is an LmforgeError) and turn them into ``ServeSettings``."""
    for flag, value, minimum in [("--port", args.port, 1), ("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 1),
                                 ("--max-tokens-limit", args.max_tokens_limit, 1), ("--max-n", args.max_n, 1),
                                 ("--max-body-bytes", args.max_body_bytes, 1024), ("--cache-size", args.cache_size, 0)]:
        if value < minimum:
            raise LmforgeError(f"{flag} must be at least {minimum} (got {value})")
    if args.port > 65535:
        raise LmforgeError(f"--port must be at most 65535 (got {args.port})")
    if args.max_n > args.max_queue:
        raise LmforgeError(f"--max-n ({args.max_n}) cannot be more than --max-queue ({args.max_queue}): each choice is queued")
    if args.threads is not None and args.threads < 1:
        raise LmforgeError(f"--threads must be at least 1 (got {args.threads})")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise LmforgeError(f"--max-prompt-tokens must be at least 1 (got {args.max_prompt_tokens})")
    if not args.rate_limit >= 0:
        raise LmforgeError(f"--rate-limit must be 0 (no limit) or more (got {args.rate_limit})")
    if not args.request_timeout > 0:
        raise LmforgeError(f"--request-timeout must be more than 0 seconds (got {args.request_timeout})")
    for origin in args.cors_origin:
        if origin == "*" or not origin.startswith(("http://", "https://")):
            raise LmforgeError(f"--cors-origin takes an origin such as https://app.example.com (got {origin!r}; '*' is not allowed)")
    keys = load_api_keys(args.api_key_file, os.environ if environ is None else environ)
    loopback = is_loopback(args.host)
    if args.no_auth and keys:
        raise LmforgeError("--no-auth was given together with API keys (--api-key-file or LMFORGE_API_KEYS); choose one")
    if not args.no_auth and not keys:
        raise LmforgeError(f"no API keys: give --api-key-file FILE or set {API_KEYS_ENV}=key1,key2, or pass --no-auth to serve "
                           "without a key on this machine only")
    if args.no_auth and not loopback and not args.insecure_bind:
        raise LmforgeError(f"refusing to serve without API keys on {args.host}, which other machines can reach; use keys, "
                           "--host 127.0.0.1, or add --insecure-bind if you really mean it")
    allowed_hosts = None
    if loopback:
        bound = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host.lower()
        allowed_hosts = tuple(dict.fromkeys([*LOCAL_HOST_NAMES, bound]))
    return ServeSettings(api_keys=tuple(keys), allowed_hosts=allowed_hosts, max_batch_size=args.max_batch_size,
                         max_queue=args.max_queue, rate_limit_per_minute=args.rate_limit, max_tokens_limit=args.max_tokens_limit,
                         max_n=args.max_n, max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                         request_timeout=args.request_timeout, cors_origins=tuple(args.cors_origin), cache_size=args.cache_size,
                         feedback_file=args.feedback_file, compile=args.compile)


def run_serve(args: argparse.Namespace) -> int:
    """Run ``lmforge serve`` from parsed arguments until SIGTERM or Ctrl-C; 0 after a graceful shutdown."""
    settings = settings_from_args(args)
    from lmforge.evaluation.report import load_for_inference, run_folder_of
    from lmforge.serving.app import ServedModel, create_app
    from lmforge.serving.server import serve_until_stopped
    from lmforge.training.checkpoint import is_finetuned_checkpoint

    _set_model_threads(args.threads)
    model, tokenizer, checkpoint = load_for_inference(args.run, args.device, prefer_finetuned=True)
    finetuned = is_finetuned_checkpoint(checkpoint)
    run_dir = run_folder_of(args.run)
    served = ServedModel(model, tokenizer, run_dir.resolve(), checkpoint, finetuned)
    app = create_app(served, settings)
    _configure_logging()

    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    print(f"serving {served.model_id} ({checkpoint}) at http://{host}:{args.port}/", file=sys.stderr)
    if settings.api_keys:
        print(f"auth: on ({len(settings.api_keys)} API key(s)); send `Authorization: Bearer <key>`", file=sys.stderr)
    else:
        print("auth: OFF (--no-auth): anyone who can reach this address can use the model", file=sys.stderr)
    if not finetuned:
        print(f"warning: {args.run} has no fine-tuned chat model, so this is the pretrained base model: it continues text "
              "rather than answering", file=sys.stderr)

    serve_until_stopped(app, args.host.strip("[]"), args.port, drain_timeout=settings.request_timeout + 5)
    print("server stopped", file=sys.stderr)
    return 0


def _set_model_threads(threads: int | None) -> None:
    """Leave a core to the event loop: when the model's thread pool takes every core, its threads wait on each
    other while the loop runs, and under load a 16-token reply of the tiny model went from 0.1 s to 10 s."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))


def _configure_logging() -> None:
    """One line per request on stderr (the guard escapes every client-given string)."""
    logger = logging.getLogger("lmforge.serving")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
