"""How far a bfloat16 decoding state (C and n in bfloat16, m in float32: generate's state_dtype, the
serving engine's slots) takes the logits from the float32 state's over a long decode.

    python benchmarks/state_dtype.py                       # CPU: the 7B head shape, 2 blocks, 1,000 tokens
    python benchmarks/state_dtype.py --device cuda --blocks 32 --vocab 50304 --ffn-factor 2.667   # the whole 7B

The model has the 7B's head shape (embedding 4096, 8 heads, DK 256, DV 512, its gate soft cap and
norms) with random weights: the release initialisation plus N(0, (2 / sqrt(D))^2) on every
parameter, so that the gates' pre-activations vary by about 2 per token (the initialisation alone
zeroes the gate weights: a state that barely moves would prove nothing). The feed-forward is
narrower (--ffn-factor) and the vocabulary smaller (--vocab) by default, to keep the CPU run to
minutes: neither touches the state. Both states decode the same tokens (the float32 run's greedy
ones, the bfloat16 run teacher-forced on them), one step at a time from the same prompt; per step,
the relative error of the logits ||l_bf16 - l_fp32|| / ||l_fp32|| and whether their argmax agree.
Writes benchmarks/results/state_dtype_<device>.json (--out: another folder): the error every 100
tokens, its maximum, its mean over the first and the last 100 tokens (an error that accumulated
would grow from one to the other), and the agreement.
"""

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

from xlstm7b import XLSTM, ModelConfig
from xlstm7b.decode import decoding_state, prefill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import cpu_name, version  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def head_shape_model(blocks: int, vocab: int, ffn_factor: float, device, seed: int = 0) -> XLSTM:
    """The 7B's head shape with `blocks` blocks and random weights (see the module docstring)."""
    config = ModelConfig.from_preset("7b").replace(num_blocks=blocks, vocab_size=vocab, ffn_proj_factor=ffn_factor)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = XLSTM(config)
    model = model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=2 / math.sqrt(config.embedding_dim))
    return model.eval()


def drift(model: XLSTM, prompt: torch.Tensor, n: int, dtype: torch.dtype) -> tuple[list[float], list[bool]]:
    """Per decoded token: the relative error of the logits with the state's C and n in `dtype`
    against a float32 state's, and whether the greedy tokens agree."""
    config, device = model.config, prompt.device
    exact, rounded = (decoding_state(None, config, prompt.shape[0], device, d) for d in (torch.float32, dtype))
    errors, agree = [], []
    with torch.no_grad():
        logits = prefill(model, prompt, None, exact, chunk=8192)
        rounded.copy_(exact)  # the prompt runs in float32 either way (as in generate); decoding rounds
        other = logits
        for _ in range(n):
            errors.append(((other.double() - logits.double()).norm() / logits.double().norm()).item())
            agree.append(bool((other.argmax(-1) == logits.argmax(-1)).all()))
            token = logits.argmax(-1)
            logits, other = model.step(token, exact), model.step(token, rounded)
    return errors, agree


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--ffn-factor", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = head_shape_model(args.blocks, args.vocab, args.ffn_factor, device)
    prompt = torch.randint(2, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    errors, agree = drift(model, prompt, args.tokens, torch.bfloat16)
    every = [dict(token=t, logits_rel_err=errors[t]) for t in range(0, args.tokens, 100)] + [
        dict(token=args.tokens - 1, logits_rel_err=errors[-1])]
    for row in every:
        print(f"token {row['token']:>5}: logits {row['logits_rel_err']:.2e} from the float32 state's", flush=True)
    c = model.config
    result = dict(
        device=args.device, device_name=torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        torch=torch.__version__, triton=version("triton"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=dict(embedding_dim=c.embedding_dim, num_heads=c.num_heads, qk_head_dim=c.qk_head_dim, v_head_dim=c.v_head_dim,
                   num_blocks=c.num_blocks, vocab_size=c.vocab_size, ffn_proj_factor=c.ffn_proj_factor, dtype="float32"),
        weights="release init + N(0, (2/sqrt(D))^2)", state_dtype="bfloat16 C and n, float32 m", tokens=args.tokens,
        prompt_len=args.prompt_len, max_logits_rel_err=max(errors), final_logits_rel_err=errors[-1],
        mean_logits_rel_err_first_100=sum(errors[1:101]) / len(errors[1:101]),
        mean_logits_rel_err_last_100=sum(errors[-100:]) / len(errors[-100:]),
        greedy_agreement=sum(agree) / len(agree), rows=every,
    )
    print(f"max {max(errors):.2e}, last {errors[-1]:.2e}, mean over the first / last 100 tokens "
          f"{result['mean_logits_rel_err_first_100']:.2e} / {result['mean_logits_rel_err_last_100']:.2e}; "
          f"greedy tokens agree at {100 * sum(agree) / len(agree):.1f} % of steps")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"state_dtype_{device.type}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
