"""The training half's commands: `xlstm7b train | tokenizer | plan | plot`, run by xlstm7b/cli.py
through `main(command, argv)`."""

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from xlstm7b import CheckpointError, from_pretrained
from xlstm7b.arguments import NON_NEGATIVE_INT, POSITIVE_INT, number, parse
from xlstm7b.pretrained import check_device, read_config
from xlstm7b.quantize import METHODS, quantize
from xlstm7b.threads import add_threads_option, set_threads, threads_value
from xlstm7b.written import check_overwrite, remember

from .checkpointing import SaveError
from .config import SECTIONS, DataConfig, load_config, writable_folder
from .data import Corpus
from .evaluate import evaluate_documents, forward_positions, machine, report, source_documents, tokenized_documents, write_outputs
from .plan import device_capacity_gb, estimate
from .plot import plot
from .tokenizer import MIN_BPE_VOCAB, load_tokenizer, token_bytes_tensor, train_bpe
from .trainer import TrainingError, train


def os_error(e: OSError) -> str:
    """An error of the file system as one line naming the path and the fix."""
    if e.filename is None:  # not a file of ours: a full disk under a library's write, a network error
        return f"{e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {e.filename}: {e.strerror}; free space (or raise the quota) and rerun"
    return f"cannot use {e.filename}: {e.strerror or e}; check that the path exists and is readable (and writable where output goes)"


def load_job(command: str, config: str, overrides: list[str]):
    """The job of a preset or TOML config with overrides, or None after printing why it is not one
    (the caller exits with 2)."""
    try:
        return load_config(config, overrides)
    except UnicodeDecodeError as e:  # a ValueError whose message names no file
        print(f"xlstm7b {command}: config {config} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
              "TOML or pass a preset name", file=sys.stderr)
        return None
    except ValueError as e:
        print(f"xlstm7b {command}: {e}", file=sys.stderr)
        return None


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="xlstm7b train",
        description="pretrain an xLSTM from a preset or TOML config; rerun on the same run.dir to resume",
        epilog=f"overrides: --section.key=value for sections {', '.join(SECTIONS)} (e.g. --train.steps=100 --run.dir=runs/x). "
               "Several processes: torchrun --nproc-per-node N -m xlstm7b train CONFIG")
    p.add_argument("config", help="preset name (debug, toy, 125m, 350m, 1.3b, 7b) or a .toml path")
    p.add_argument("--threads", type=threads_value, metavar="N", help="CPU threads per process, as --train.threads=N "
                   "(0: the cores other processes do not keep busy, divided among this machine's processes of the run)")
    args, overrides = p.parse_known_args(argv)
    if args.threads is not None:
        overrides.append(f"--train.threads={args.threads}")
    job = load_job("train", args.config, overrides)
    if job is None:
        return 2
    try:
        return train(job)
    except (TrainingError, SaveError, ValueError) as e:
        print(f"xlstm7b train: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"xlstm7b train: {os_error(e)}", file=sys.stderr)
        return 1


def tokenizer_main(argv: list[str]) -> int:
    """`xlstm7b tokenizer train`: train a byte-level BPE on a config's training split."""
    p = argparse.ArgumentParser(prog="xlstm7b tokenizer", description="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the training split of a config's [data] source")
    t.add_argument("config", help="preset name or .toml path (its [data] section and model.vocab_size)")
    t.add_argument("--output", "-o", required=True, help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=0, help="default: the config's model.vocab_size")
    t.add_argument("--overwrite", action="store_true", help="replace --output even if xlstm7b did not write it")
    args, overrides = t.parse_known_args(argv[1:]) if argv[:1] == ["train"] else (p.parse_args(argv), [])
    if args.vocab_size and args.vocab_size < MIN_BPE_VOCAB:
        t.error(f"--vocab-size {args.vocab_size} is too small for a byte-level BPE: at least {MIN_BPE_VOCAB} (256 bytes + 2 special tokens)")
    out = Path(args.output)
    if out.is_dir():
        t.error(f"--output {out} is a folder; pass a file path such as {out / 'tokenizer.json'}")
    job = load_job("tokenizer", args.config, overrides)
    if job is None:
        return 2
    try:
        if not args.overwrite:
            check_overwrite(out, "tokenizer", "pass another --output, or --overwrite to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        corpus = Corpus(job.data)
        tok = train_bpe((text for _, text in corpus.documents("train")), args.vocab_size or job.model.vocab_size)
        tok.save(str(out))
        remember(out.parent, [out.name], "tokenizer")
    except ValueError as e:
        print(f"xlstm7b tokenizer: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"xlstm7b tokenizer: {os_error(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {tok.get_vocab_size()} tokens trained on the training split of {job.data.source!r}")
    return 0


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="xlstm7b plan", description="parameter count and per-GPU memory of a training config")
    p.add_argument("config", help="preset name or .toml path")
    p.add_argument("--gpus", type=POSITIVE_INT, default=1, help="number of GPUs (processes) to plan for")
    p.add_argument("--gpu-memory-gb", type=number(float, 0, what="a finite number of GiB >= 0 (0: the device's)"), default=0,
                   help="memory per GPU (default: this machine's GPU, else 80)")
    args, overrides = p.parse_known_args(argv)
    job = load_job("plan", args.config, overrides)
    if job is None:
        return 2
    device = torch.device("cuda")
    capacity = args.gpu_memory_gb or job.run.gpu_memory_gb or (device_capacity_gb(device, 0) if torch.cuda.is_available() else 80.0)
    try:
        plan = estimate(job, args.gpus, device, capacity)
    except ValueError as e:  # train.micro_batch = 0 with a global batch the processes cannot share
        print(f"xlstm7b plan: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a weight past what torch can index, met building the model on the meta device
        c = job.model
        print(f"xlstm7b plan: the [model] section of {args.config} is too large to build (embedding_dim={c.embedding_dim}, "
              f"num_blocks={c.num_blocks}, vocab_size={c.vocab_size}: {e}); lower them", file=sys.stderr)
        return 2
    print(plan.report(job))
    return 0 if plan.fits else 1


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="xlstm7b plot", description="loss, bits-per-byte and throughput curves from metrics.jsonl as a PNG")
    p.add_argument("run_dir")
    p.add_argument("--output", "-o", help="PNG path (default RUN_DIR/metrics.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the PNG even if xlstm7b did not write it")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.output) if args.output else run_dir / "metrics.png"
    try:
        if not args.overwrite:
            check_overwrite(out, "plot", "pass another --output, or --overwrite to replace it")
        out = plot(run_dir, out)
        remember(out.parent, [out.name], "plot")
    except ImportError:
        print("xlstm7b plot needs matplotlib: pip install 'xlstm7b[plot]'", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"xlstm7b plot: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"xlstm7b plot: {os_error(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    p = argparse.ArgumentParser(
        prog="xlstm7b eval", description="bits-per-byte, loss and perplexity of a saved model on a data source, "
        "overall and by token position; every document scored whole, with constant memory")
    p.add_argument("--checkpoint", required=True, help="model folder (any layout from_pretrained reads)")
    p.add_argument("--data", required=True, metavar="SOURCE", help="'stdlib', a local file/folder/glob or a hub dataset, as data.source")
    p.add_argument("--split", choices=["val", "train", "all"],
                   help="which documents: the trainer's validation or training split (by --val-fraction), or all. Default: "
                        "'val' when SOURCE is the corpus the checkpoint's run trained on, else 'all'")
    p.add_argument("--val-fraction", type=number(float, 0, 1, what="a number in [0, 1)", high_open=True),
                   help="as data.val_fraction (default: the training run's value, else the trainer's default)")
    p.add_argument("--text-field", default=d.text_field, help="as data.text_field")
    p.add_argument("--hub-config", default=d.hub_config, help="as data.hub_config")
    p.add_argument("--hub-split", default=d.hub_split, help="as data.hub_split")
    p.add_argument("--max-documents", type=NON_NEGATIVE_INT, default=0, help="read at most this many documents of the source (0 = all)")
    p.add_argument("--tokenizer", help="tokenizer.json or hub name (default: the one in the checkpoint folder)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="documents scored side by side")
    p.add_argument("--piece-tokens", type=POSITIVE_INT, default=2048, help="positions per forward; the state carries across pieces")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--quantize", choices=METHODS, help="score the model with its weights quantised as `xlstm7b generate "
                   "--quantize` decodes with them (xlstm7b.quantize): int8 on CUDA or CPU, int4 on CUDA with bfloat16")
    add_threads_option(p)
    p.add_argument("--out", type=Path, help="write the result as JSON here, and the loss-by-position plot beside it (.png)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace files xlstm7b did not write")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar on stderr")
    return p


def training_run_of(checkpoint: str) -> dict | None:
    """The config of the training run that exported `checkpoint` (RUN_DIR/model), if it is one."""
    try:
        config = json.loads((Path(checkpoint).expanduser().resolve().parent / "config.json").read_text())
        return config if isinstance(config.get("data"), dict) and "train" in config else None
    except (OSError, ValueError, AttributeError):
        return None


def eval_split(args: argparse.Namespace) -> tuple[str, float]:
    """The split and val_fraction to score: the run's validation split of its own corpus; all of any other source."""
    run = training_run_of(args.checkpoint)
    trained_on = run is not None and run["data"].get("source") == args.data
    split = args.split or ("val" if trained_on else "all")
    default = run["data"].get("val_fraction", DataConfig().val_fraction) if trained_on else DataConfig().val_fraction
    return split, default if args.val_fraction is None else args.val_fraction


def eval_main(argv: list[str]) -> int:
    """`xlstm7b eval`: bits-per-byte, loss, perplexity and loss by position of a saved model."""
    p = eval_parser()
    args = parse(p, argv)
    if isinstance(args, int):
        return args
    split, val_fraction = eval_split(args)
    if args.out is not None and args.out.is_dir():
        p.error(f"--out {args.out} is a folder; pass a file path such as {args.out / 'eval.json'}")
    data = DataConfig(source=args.data, text_field=args.text_field, hub_config=args.hub_config, hub_split=args.hub_split,
                      max_documents=args.max_documents, val_fraction=val_fraction)
    bar = None
    try:
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
        threads = set_threads(args.threads)
        if args.out is not None:  # before the work, not after it
            writable_folder(str(args.out.parent), "out")
            for out in (args.out, args.out.with_suffix(".png")):
                if not args.overwrite:
                    check_overwrite(out, "eval", "pass another --out, or --overwrite to replace it")
        if Path(args.checkpoint).is_dir():  # else from_pretrained says what is wrong with the path
            forward_positions(args.batch_size, args.piece_tokens, read_config(Path(args.checkpoint)).chunk_size)
        model = from_pretrained(args.checkpoint, device=device, dtype=dtype)
        if args.quantize:
            quantize(model, args.quantize)
        tok_source = args.tokenizer or Path(args.checkpoint) / "tokenizer.json"
        if not args.tokenizer and not Path(tok_source).is_file():
            raise FileNotFoundError(f"{args.checkpoint} has no tokenizer.json; pass --tokenizer PATH")
        tok = load_tokenizer(tok_source)
        tbytes = token_bytes_tensor(tok, model.config.vocab_size, device)
        docs = tokenized_documents(source_documents(data, split), tok, model.config.bos_token_id)
        if args.progress:
            bar = tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr, desc="eval")

            def progress(tokens, bpb):
                bar.update(tokens - bar.n)
                bar.set_postfix(bpb=f"{bpb:.4f}", refresh=False)
        result = evaluate_documents(model, docs, tbytes, batch_size=args.batch_size, piece_tokens=args.piece_tokens,
                                    progress=progress if bar is not None else None)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"xlstm7b eval: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"xlstm7b eval: {os_error(e)}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "split": split, "val_fraction": val_fraction,
              "dtype": str(dtype).removeprefix("torch."), "quantize": args.quantize, "batch_size": args.batch_size, "piece_tokens": args.piece_tokens,
              **result, "machine": machine(device)}
    print(report(result, threads))
    if args.out:
        try:
            print("wrote " + ", ".join(map(str, write_outputs(result, args.out))))
        except OSError as e:
            print(f"xlstm7b eval: {os_error(e)}", file=sys.stderr)
            return 1
    return 0


COMMANDS = {"train": train_main, "tokenizer": tokenizer_main, "plan": plan_main, "plot": plot_main, "eval": eval_main}


def main(command: str, argv: list[str]) -> int:
    try:
        code = COMMANDS[command](argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except SystemExit as e:  # argparse's message about a bad argument (2) or --help (0): printed, returned as the code
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:  # training itself turns the first Ctrl-C into a checkpoint and a stop
        print(f"xlstm7b {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `xlstm7b plan 7b | head -3`: the reader has what it wanted
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
