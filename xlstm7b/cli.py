"""The `xlstm7b` command (also `python -m xlstm7b`). Each subcommand lives next to what it drives
and is imported only when used, so `xlstm7b info` never loads the training stack."""

import argparse
import importlib
import sys

# name -> (module:function taking argv, one-line help)
SUBCOMMANDS = {
    "info": ("xlstm7b.cli:info_main", "build a model from a preset or TOML file; print its size, state size and a forward pass"),
    "train": ("xlstm7b.train.cli:train_main", "pretrain from a preset or TOML config (--section.key=value overrides); resumes a run"),
    "tokenizer": ("xlstm7b.train.tokenizer:tokenizer_main", "train a byte-level BPE tokenizer on a config's corpus"),
    "plan": ("xlstm7b.train.plan:plan_main", "parameter count and per-GPU memory of a training config; whether it fits"),
    "plot": ("xlstm7b.train.plot:plot_main", "plot loss, bits-per-byte and throughput of a run directory to a PNG"),
    "generate": ("xlstm7b.generate:cli_main", "generate text from a checkpoint folder, streamed as it is produced"),
}


def info_main(argv: list[str]) -> int:
    import time

    import torch

    from .config import ModelConfig, preset_names, preset_path
    from .model import XLSTM
    from .state import State

    p = argparse.ArgumentParser(prog="xlstm7b info", description=SUBCOMMANDS["info"][1])
    p.add_argument("config", nargs="?", default="toy", help=f"preset name ({', '.join(preset_names())}) or a .toml path")
    p.add_argument("--seq-len", type=int, default=128, help="length of the demo forward pass (0 to skip it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    config = ModelConfig.from_toml(preset_path(args.config))
    with torch.device("meta"):
        meta_model = XLSTM(config)
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
        torch.manual_seed(args.seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = XLSTM(config).to(device).eval()
        ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
        ids[:, 0] = config.bos_token_id
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, state = model(ids)
        dt = time.perf_counter() - t0
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
        print(f"forward         {args.seq_len} tokens on {device} in {dt * 1000:.1f} ms; logits {list(logits.shape)}, "
              f"loss on random ids {loss:.3f} (ln V = {torch.log(torch.tensor(float(config.vocab_size))):.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: xlstm7b COMMAND [ARGS...]\n\ncommands:")
        for name, (_, help_) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_}")
        print("\n'xlstm7b COMMAND --help' for a command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"xlstm7b: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, func = SUBCOMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), func)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
