"""The `xlstm7b` command (also `python -m xlstm7b`): the inference commands (`info`, `generate`)
live here; the training commands are in the training half's one front-end, `xlstm7b.train.cli`,
imported only when one of them runs, so `xlstm7b info` never loads the training stack."""

import argparse
import contextlib
import importlib
import os
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .arguments import NON_NEGATIVE_INT, POSITIVE_INT, number, parse
from .pretrained import CheckpointError, check_device, from_pretrained, read_config
from .config import ModelConfig, preset_names, preset_path
from .generate import check_decoding, generate
from .model import XLSTM
from .quantize import METHODS, quantize
from .sampling import SamplingError, SamplingParams
from .state import State
from .streaming import TextStreamer
from .threads import add_threads_option, set_threads, threads_text

# name -> one-line help
SUBCOMMANDS = {
    "info": "build a model from a preset or TOML file; print its size, state size and a forward pass",
    "train": "pretrain from a preset or TOML config (--section.key=value overrides); resumes a run",
    "tokenizer": "train a byte-level BPE tokenizer on a config's corpus",
    "plan": "parameter count and per-GPU memory of a training config; whether it fits",
    "plot": "plot loss, bits-per-byte and throughput of a run directory to a PNG",
    "eval": "bits-per-byte, loss and perplexity of a checkpoint on a data source, overall and by token position",
    "generate": "generate text from a checkpoint folder, streamed as it is produced",
    "serve": "serve a checkpoint folder over an OpenAI-compatible HTTP API (continuous batching)",
}
TRAIN_CLI = "xlstm7b.train.cli"
"""The training half's front-end: `main(command, argv)` runs train, tokenizer, plan and plot."""
SERVE_CLI = "xlstm7b.serve.cli"
"""The server's front-end, `main(argv)`: imported only by `xlstm7b serve`, so no other command loads FastAPI."""


INFO_MAX_SEQ_LEN = 65536
"""Longest demo forward pass of `xlstm7b info` (its logits are [1, S, V] float32 in memory)."""


def fail(command: str, message: str, code: int = 2) -> int:
    """Prints `xlstm7b COMMAND: message` to stderr; returns the exit code (2: bad input)."""
    print(f"xlstm7b {command}: {message}", file=sys.stderr)
    return code


def info_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="xlstm7b info", description=SUBCOMMANDS["info"])
    p.add_argument("config", nargs="?", default="toy", help=f"preset name ({', '.join(preset_names())}) or a .toml path")
    p.add_argument("--seq-len", type=number(int, 0, INFO_MAX_SEQ_LEN, what=f"an integer in [0, {INFO_MAX_SEQ_LEN}]"),
                   default=128, help="length of the demo forward pass (0 to skip it)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    args = parse(p, argv)
    if isinstance(args, int):
        return args
    try:
        path = preset_path(args.config)
    except ValueError as e:  # an unknown preset, a missing file or a folder
        return fail("info", str(e))
    try:
        config = ModelConfig.from_toml(path)
    except OSError as e:
        return fail("info", f"cannot read {path}: {e.strerror or e}")
    except ValueError as e:  # malformed TOML or an invalid [model] section
        return fail("info", str(e))

    try:
        with torch.device("meta"):
            meta_model = XLSTM(config)
    except RuntimeError as e:  # a weight past what torch can index: no machine holds such a model
        return fail("info", f"the [model] section of {args.config} is too large to build (embedding_dim={config.embedding_dim}, "
                            f"num_blocks={config.num_blocks}, vocab_size={config.vocab_size}: {e}); lower them")
    n_params = meta_model.num_params()
    state_bytes = State.zeros(config, 1, device="meta").nbytes
    print(f"config          {args.config}: D={config.embedding_dim} blocks={config.num_blocks} heads={config.num_heads} "
          f"dqk={config.qk_head_dim} dv={config.v_head_dim} ffn={config.ffn_dim} vocab={config.vocab_size}")
    print(f"parameters      {n_params:,} ({n_params * 2 / 2**30:.2f} GiB in bf16)")
    print(f"state           {state_bytes / 2**20:.2f} MiB per sequence (float32), constant in sequence length")
    if args.seq_len > 0:
        if n_params > 2e9 and not torch.cuda.is_available():
            print("forward         skipped: the model is too large to build on this CPU")
            return 0
        return demo_forward(config, n_params, args.seq_len, args.seed)
    return 0


def free_bytes(device: str) -> int:
    """Memory free for new tensors on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as fh:
            return int(next(line for line in fh if line.startswith("MemAvailable:")).split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def demo_forward(config: ModelConfig, n_params: int, seq_len: int, seed: int) -> int:
    """`xlstm7b info`'s forward pass on random ids, refused before anything is allocated when its
    float32 weights and logits ([1, S, V], the product and its soft-capped copy) exceed free memory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    need, free = 4 * n_params + 8 * seq_len * config.vocab_size, free_bytes(device)
    if need > free:
        fits = max(0, (free - 4 * n_params) // (8 * config.vocab_size))
        return fail("info", f"--seq-len {seq_len}: the demo forward pass needs at least {need / 2**30:.1f} GiB (float32 weights "
                            f"and logits [1, {seq_len}, {config.vocab_size}]), {device} has {free / 2**30:.1f} GiB free; "
                            f"{f'lower --seq-len (at most about {fits} fits) or ' if fits else ''}pass --seq-len 0 to skip it")
    torch.manual_seed(seed)
    model = XLSTM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    ids[:, 0] = config.bos_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, state = model(ids)
    dt = time.perf_counter() - t0
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
    print(f"forward         {seq_len} tokens on {device} in {dt * 1000:.1f} ms; logits {list(logits.shape)}, "
          f"loss on random ids {loss:.3f} (ln V = {torch.log(torch.tensor(float(config.vocab_size))):.3f})")
    return 0


def generate_main(argv: list[str]) -> int:
    """`xlstm7b generate`: loads a checkpoint folder and its tokenizer, streams the continuation.
    Exit codes: 0 done, 1 the model failed (non-finite logits), 2 bad input, 130 interrupted,
    141 the output was closed (e.g. piped into `head`)."""
    p = argparse.ArgumentParser(prog="xlstm7b generate", description="Generate text from a checkpoint folder.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--prompt", required=True, help="prompt text ('' starts from the BOS token alone)")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the one in the checkpoint folder)")
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE_INT, default=128)
    # The sampling options are checked by SamplingParams, as generate() and the server check them.
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (the default)")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens (0 or -1: no limit)")
    p.add_argument("--top-p", type=float, help="sample in the nucleus of probability P, in (0, 1]")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below P times the most likely one's probability")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], as in OpenAI's API")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], as in OpenAI's API")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0, as in vLLM and Hugging Face (1: none)")
    p.add_argument("--seed", type=int, help="an integer in [0, 2**64): reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STRING", help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    add_threads_option(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (faster decoding, after a compilation of seconds to a minute; "
                        "on CUDA its fused kernels are captured in the CUDA graph)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it is produced")
    p.add_argument("--draft", metavar="DIR", help="a smaller checkpoint with the same tokenizer: speculative decoding")
    p.add_argument("--speculate-k", type=POSITIVE_INT, default=4, metavar="K", help="draft tokens per verification (with --draft)")
    p.add_argument("--quantize", choices=METHODS, help="weight-only quantisation of the model through torchao "
                   "(xlstm7b.quantize): int8 on CUDA or CPU, int4 on CUDA with bfloat16")
    args = parse(p, argv)
    if isinstance(args, int):
        return args
    try:
        return run_generate(args)
    except (CheckpointError, ValueError, TypeError, ImportError) as e:
        return fail("generate", str(e))
    except FloatingPointError as e:
        return fail("generate", str(e), 1)
    except KeyboardInterrupt:
        return fail("generate", "interrupted", 130)
    except BrokenPipeError:
        # Later writes (and the interpreter's last flush) must not fail again on the closed pipe.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return fail("generate", "the output was closed (broken pipe); stopped generating", 141)


def open_tokenizer(path: Path, default: bool, vocab_size: int) -> Tokenizer:
    """The tokenizer.json at `path` (`default`: the checkpoint folder's own), checked against the
    model's vocabulary; a ValueError that names the file and the fix."""
    fix = "pass --tokenizer PATH/tokenizer.json" if default else "pass the tokenizer.json the model was trained with"
    where = " in the checkpoint folder" if default else ""
    if not path.exists():
        raise ValueError(f"tokenizer file {path} not found{where}; {fix}")
    if not path.is_file():
        raise ValueError(f"tokenizer {path} is not a file; {fix}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for unreadable or malformed files
        raise ValueError(f"tokenizer file {path} cannot be read as a tokenizer.json ({e}); {fix}") from e
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer {path} has {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size="
                         f"{vocab_size}; {fix}")
    return tokenizer


def run_generate(args: argparse.Namespace) -> int:
    # The cheap checks first: device, configs, tokenizer and sampling arguments, then the weights.
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = set_threads(args.threads)
    config = read_config(checkpoint_folder(args.checkpoint, "--checkpoint"))
    tok_path = Path(args.tokenizer).expanduser() if args.tokenizer else Path(args.checkpoint) / "tokenizer.json"
    tokenizer = open_tokenizer(tok_path, args.tokenizer is None, config.vocab_size)
    if args.draft is not None:
        draft_config = read_config(checkpoint_folder(args.draft, "--draft"))
        if draft_config.vocab_size != config.vocab_size:
            raise ValueError(f"--draft {args.draft} has vocab_size={draft_config.vocab_size}, the model "
                             f"{config.vocab_size}: a draft must share the model's tokenizer")
    eos_token_id = None if args.ignore_eos else config.eos_token_id
    sampling = sampling_options(args, config.vocab_size)
    check_decoding(args.max_new_tokens, eos_token_id, 1, config.vocab_size)

    model = from_pretrained(args.checkpoint, device=device, dtype=dtype)
    if args.quantize:
        quantize(model, args.quantize)
    draft = None
    if args.draft is not None:
        draft = from_pretrained(args.draft, device=device, dtype=dtype)
        draft_tok = Path(args.draft) / "tokenizer.json"
        if draft_tok.is_file() and draft_tok.read_bytes() != tok_path.read_bytes():
            print(f"xlstm7b generate: warning: {draft_tok} differs from {tok_path}; the output is still the "
                  "target's, but a draft with another tokenizer is rarely accepted", file=sys.stderr)
    ids = [config.bos_token_id] + tokenizer.encode(args.prompt, add_special_tokens=False).ids
    streamer = TextStreamer(tokenizer, stop=args.stop, out=sys.stdout if args.stream else None)
    if args.compile:
        print("compiling the decode step (the first time for a model and batch size takes up to a minute) ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = generate(
        model, [ids], max_new_tokens=args.max_new_tokens, **sampling, eos_token_id=eos_token_id, streamer=streamer, draft=draft,
        speculate_k=args.speculate_k, compile=args.compile or None,  # None: generate's default (compiled on CUDA)
    )
    dt = time.perf_counter() - t0
    if not args.stream:
        print(streamer.text, flush=True)
    n = int(out.lengths[0])
    spec = "" if out.stats is None else f", draft acceptance {out.stats['acceptance_rate']:.2f} at K={args.speculate_k}"
    print(f"[{len(ids)} prompt + {n} generated tokens in {dt:.2f} s, {n / dt:.1f} tok/s on {device}{spec}, {threads_text(threads)}]", file=sys.stderr)
    return 0


def sampling_options(args: argparse.Namespace, vocab_size: int) -> dict:
    """generate()'s sampling arguments from the options, checked by SamplingParams; a ValueError
    naming the option at fault."""
    names = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed")
    options = {name: getattr(args, name) for name in names}
    try:
        SamplingParams(**options).validate(vocab_size)
    except SamplingError as e:
        raise ValueError(f"--{e.name.replace('_', '-')}: must be {e.requirement}, got {e.value!r}") from None
    return options


def checkpoint_folder(path: str, option: str) -> Path:
    """`path` given as `option`, checked to be an existing folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"{option} {path}: no such folder; pass a checkpoint folder (config.json + safetensors)")
    if not folder.is_dir():
        raise ValueError(f"{option} {path} is a file; pass the checkpoint folder (config.json + safetensors)")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: xlstm7b COMMAND [ARGS...]\n\ncommands:")
        for name, help_ in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_}")
        print("\n'xlstm7b COMMAND --help' for a command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"xlstm7b: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    if name == "info":
        return info_main(rest)
    if name == "generate":
        return generate_main(rest)
    if name == "serve":
        return importlib.import_module(SERVE_CLI).main(rest)
    return importlib.import_module(TRAIN_CLI).main(name, rest) or 0


if __name__ == "__main__":
    sys.exit(main())
