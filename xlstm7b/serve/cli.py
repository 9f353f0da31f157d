"""`xlstm7b serve`: loads a checkpoint folder and serves it over the OpenAI-style HTTP API (api.py)
with uvicorn. SIGTERM or Ctrl-C: new requests get 503 at once (the server still listens), the
running and waiting ones finish for at most --shutdown-timeout seconds, those still running then end
(a stream with finish reason "cancelled" and [DONE]), and the server exits; a second signal exits
at once. One access-log line per request goes to stderr (--no-access-log: none)."""

import argparse
import logging
import socket
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..arguments import POSITIVE_INT, number
from ..pretrained import CheckpointError, from_pretrained
from ..threads import add_threads_option, set_threads
from .config import STATE_DTYPES, EngineConfig
from .engine import Engine

try:
    import uvicorn

    from .api import build_app, default_prompt_chars
    from .chat import ChatTemplate
    from .limits import Limits
    from .server import Server
except ImportError as e:  # the `serve` extra is not installed; main() says so
    MISSING = e.name
else:
    MISSING = None


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def address_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (checked before the weights load), or None."""
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as e:
        return (f"cannot listen on {host}:{port}: {e.strerror or e}; pass another --port (or stop what uses it) "
                "or a --host address of this machine")


POSITIVE = number(float, 0, low_open=True, what="a number > 0")
NON_NEGATIVE = number(float, 0, what="a number >= 0")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="xlstm7b serve", description="Serve a checkpoint over an OpenAI-compatible HTTP API "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (config.json + safetensors [+ tokenizer.json])")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer.json (default: the checkpoint folder's; without one, prompts must be token ids)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port, 0 to 65535 (0: any free one; default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=64, metavar="N",
                   help="state slots: requests prefilled or decoded at once (default: %(default)s)")
    p.add_argument("--max-queue", type=POSITIVE_INT, default=1024, metavar="N",
                   help="requests that may wait for a slot; more get 503 overloaded (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=POSITIVE_INT, default=32768, metavar="N",
                   help="longest prompt accepted, in tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=4096, metavar="N",
                   help="largest max_tokens a request may ask for; chat's default max_tokens (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=POSITIVE_INT, default=256, metavar="N",
                   help="prompt tokens a request prefills per scheduler iteration, also the prefix cache's granularity "
                        "(default: %(default)s)")
    p.add_argument("--prefill-tokens", type=POSITIVE_INT, default=4096, metavar="N",
                   help="padded prompt tokens one prefill pass may run (default: %(default)s)")
    p.add_argument("--prefix-cache-mb", type=NON_NEGATIVE, default=1024, metavar="MB",
                   help="memory for cached prefix states (0: no prefix cache; default: %(default)s)")
    p.add_argument("--state-dtype", choices=list(STATE_DTYPES), default="bfloat16",
                   help="dtype of the state slots' C and n (bfloat16, the default, halves their memory and traffic "
                        "against float32; m stays float32)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights: auto is bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    add_threads_option(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (once per batch bucket, at start; on CUDA captured in the bucket's CUDA graph)")
    p.add_argument("--shutdown-timeout", type=NON_NEGATIVE, default=30.0, metavar="S",
                   help="seconds running requests get to finish on SIGTERM (default: %(default)s)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr: id, tokens, time to first token, total time, finish reason")
    limits = p.add_argument_group("limits on a request (each refusal names its flag)")
    limits.add_argument("--max-body-mb", type=POSITIVE, default=Limits.max_body_bytes / 2**20, metavar="MB",
                        help="largest request body, 413 beyond (default: %(default)s)")
    limits.add_argument("--max-prompt-chars", type=POSITIVE_INT, metavar="N",
                        help="longest prompt text, checked before tokenizing (default: --max-prompt-tokens times the "
                             "longest token's text, which no prompt within --max-prompt-tokens exceeds)")
    limits.add_argument("--max-n", type=POSITIVE_INT, default=Limits.max_n, metavar="N",
                        help="largest n and best_of (default: %(default)s)")
    limits.add_argument("--max-prompts", type=POSITIVE_INT, default=Limits.max_prompts, metavar="N",
                        help="most prompts in one completions request (default: %(default)s)")
    limits.add_argument("--max-stop-strings", type=POSITIVE_INT, default=EngineConfig.max_stop_strings, metavar="N",
                        help="most stop strings per request (default: %(default)s)")
    limits.add_argument("--max-stop-chars", type=POSITIVE_INT, default=EngineConfig.max_stop_chars, metavar="N",
                        help="longest stop string (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    if MISSING is not None:
        print(f"xlstm7b serve needs the serve extra ({MISSING} is not installed): pip install 'xlstm7b[serve]'", file=sys.stderr)
        return 2
    args = parse_args(argv)
    folder = Path(args.checkpoint)
    tok_path = Path(args.tokenizer) if args.tokenizer else folder / "tokenizer.json"
    if args.tokenizer and not tok_path.is_file():
        print(f"xlstm7b serve: tokenizer file {tok_path} not found", file=sys.stderr)
        return 2
    if (problem := address_problem(args.host, args.port)) is not None:
        print(f"xlstm7b serve: {problem}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    set_threads(args.threads)
    config = EngineConfig(
        max_batch=args.max_batch, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_tokens, prefill_chunk=args.prefill_chunk, prefill_tokens=args.prefill_tokens,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), state_dtype=STATE_DTYPES[args.state_dtype], compile=args.compile,
        max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
    )
    try:
        model = from_pretrained(folder, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.is_file() else None
        engine = Engine(model, config, tokenizer)
    except (CheckpointError, ValueError) as e:
        print(f"xlstm7b serve: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"xlstm7b serve: warning: no tokenizer ({tok_path} not found): only token-id prompts to /v1/completions work",
              file=sys.stderr)
    name = args.model_name or folder.resolve().name
    if args.compile:
        print(f"compiling the decode step for batch buckets {engine.buckets} ...", file=sys.stderr, flush=True)
    engine.start()
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_n=args.max_n, max_prompts=args.max_prompts,
                    max_prompt_chars=args.max_prompt_chars or default_prompt_chars(engine))
    app = build_app(engine, model_name=name, chat_template=ChatTemplate.from_checkpoint(folder), api_key=args.api_key,
                    limits=limits)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("xlstm7b.serve").addHandler(handler)
    logging.getLogger("xlstm7b.serve.access").setLevel(logging.INFO if args.access_log else logging.WARNING)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({device}, {config.max_batch} state slots of "
          f"{engine.slot_bytes / 2**20:.2f} MiB, {args.state_dtype})", file=sys.stderr, flush=True)
    # Draining happens before uvicorn's own graceful shutdown begins: it only closes what is left.
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5),
                    engine, args.shutdown_timeout)
    server.run()  # the app stops the engine when it shuts down
    return 0

