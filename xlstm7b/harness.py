"""EleutherAI's lm-evaluation-harness model type `xlstm7b` (needs `pip install 'xlstm7b[eval]'`).

    python -m xlstm7b.harness --model xlstm7b --model_args pretrained=DIR,dtype=bfloat16 --tasks hellaswag --batch_size 8

lm-eval 0.4 finds model types only in its own registry (no plugin entry points), so this module
registers `xlstm7b` when imported and, run as a program, hands its arguments to lm-eval's own
command line: every `lm_eval` option works. From Python: `import xlstm7b.harness`, then
`lm_eval.simple_evaluate(model="xlstm7b", model_args=...)`, or pass an `XLSTMLM` instance.

What it does differently from transformers' xLSTM port through the `hf` type:
- Every document, context and prompt runs whole: no context cap, no sliding window. The recurrent
  state carries long inputs through in pieces of `piece_tokens` positions (constant memory).
- Ragged batches are exact. Scoring right-pads (padding comes after every scored position, so it
  cannot reach one); generation left-pads and masks the padding out of the state (`generate`).
- Every input starts with the BOS token, as the model saw every document in training.

It lives in the model package because it needs the model, its tokenizer and `generate` only; the
training stack (`xlstm7b.train`) stays out of it.
"""

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tokenizers import Tokenizer
from tqdm import tqdm

from .generate import generate
from .model import XLSTM, check_token_ids
from .pretrained import CheckpointError, check_device, from_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def harness_device(device: str | None) -> torch.device:
    """`device` as lm-eval's hf type takes it: a CUDA device where there is none means the CPU, with
    a notice (lm-eval passes 'cuda:0' unless told otherwise); any other name must exist here."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            print(f"xlstm7b: device {device!r} asked for, but this machine has no CUDA device: running on the CPU",
                  file=sys.stderr)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


class XLSTMLM(TemplateLM):
    """An xLSTM checkpoint folder (any layout `from_pretrained` reads) as an lm-eval model.

    pretrained: the folder, or an XLSTM instance (then `tokenizer` is required).
    tokenizer: a tokenizer.json path or a `tokenizers.Tokenizer` (default: the folder's tokenizer.json).
    batch_size: requests per forward (an integer; lm-eval's 'auto' is not supported).
    device, dtype: where and in which dtype to run ('auto': bfloat16 on CUDA, float32 on CPU).
    max_gen_toks: generate_until's token budget when a task does not set one.
    piece_tokens: positions per forward; longer inputs are carried through in pieces.
    seed: the seed of sampled generation (tasks with do_sample=True).
    """

    def __init__(
        self,
        pretrained: str | XLSTM,
        tokenizer: str | Tokenizer | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        max_gen_toks: int = 256,
        piece_tokens: int = 8192,
        logits_chunk_tokens: int = 2048,
        seed: int = 1234,
    ):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"xlstm7b: batch_size must be a positive integer, got {batch_size!r} ('auto' is not supported)")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"xlstm7b: dtype must be 'auto' or one of {list(DTYPES)}, got {dtype!r}")
        for name, value in (("max_gen_toks", max_gen_toks), ("piece_tokens", piece_tokens), ("logits_chunk_tokens", logits_chunk_tokens)):
            if int(value) < 1:
                raise ValueError(f"xlstm7b: {name} must be >= 1, got {value!r}")
        self._device = harness_device(device)
        torch_dtype = DTYPES[dtype] if dtype != "auto" else torch.bfloat16 if self._device.type == "cuda" else torch.float32
        if isinstance(pretrained, XLSTM):
            if tokenizer is None:
                raise ValueError("xlstm7b: pass tokenizer= (a tokenizer.json path or a Tokenizer) with a model instance")
            self.model = pretrained.to(self._device).eval()
        else:
            self.model = from_pretrained(pretrained, device=self._device, dtype=torch_dtype)
            if tokenizer is None:
                tokenizer = Path(pretrained) / "tokenizer.json"
                if not tokenizer.is_file():
                    raise FileNotFoundError(f"xlstm7b: {pretrained} has no tokenizer.json; pass tokenizer=PATH in model_args")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
        self.config = self.model.config
        n = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if n > self.config.vocab_size:
            raise ValueError(f"xlstm7b: the tokenizer has {n} tokens, more than the model's vocab_size {self.config.vocab_size}")
        self.batch_size = int(batch_size)
        self.max_gen_toks_default = int(max_gen_toks)
        self.piece_tokens = -(-int(piece_tokens) // self.config.chunk_size) * self.config.chunk_size
        self.logits_chunk_tokens = int(logits_chunk_tokens)
        self.seed = int(seed)

    # --- what TemplateLM needs ----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.config.bos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self.max_gen_toks_default

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "xlstm7b-tokenizer"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def with_bos(self, ids: list[int]) -> list[int]:
        bos = self.config.bos_token_id
        return ids if ids[:1] == [bos] else [bos, *ids]

    # --- scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, rows: list[list[int]], starts: list[int], desc: str = "scoring") -> list[tuple[float, bool]]:
        """For each row, the summed log-probability of its tokens from index `start` on (each given all
        tokens before it) and whether each of them is the greedy choice. Longest rows first, batched."""
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        with tqdm(total=len(rows), desc=desc, disable=len(rows) < 2 * self.batch_size, file=sys.stderr) as bar:
            for lo in range(0, len(order), self.batch_size):
                batch = order[lo : lo + self.batch_size]
                logprob, greedy = self.score_batch([rows[r] for r in batch], [starts[r] for r in batch])
                for r, lp, g in zip(batch, logprob.tolist(), greedy.tolist()):
                    out[r] = (lp, g)
                bar.update(len(batch))
        return out

    def score_batch(self, rows: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        B, S = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, S), self.config.pad_token_id, dtype=torch.long)
        for b, r in enumerate(rows):  # right padding: every row starts at position 0 from the empty state
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        check_token_ids(ids, self.config.vocab_size)  # once, on the host copy: the forwards need not check them
        ids = ids.to(self._device)
        lengths = torch.tensor([len(r) for r in rows], device=self._device)
        shortest = min(len(r) for r in rows)
        first = torch.tensor(starts, device=self._device)
        logprob = torch.zeros(B, dtype=torch.float64, device=self._device)
        wrong = torch.zeros(B, dtype=torch.long, device=self._device)
        state = None
        for a in range(0, S - 1, self.piece_tokens):
            inputs, targets = ids[:, a : a + self.piece_tokens], ids[:, a + 1 : a + self.piece_tokens + 1]
            j = torch.arange(a, a + inputs.shape[1], device=self._device)
            padded = shortest < a + inputs.shape[1]  # from the lengths on the host
            mask = j < lengths[:, None] if padded else None
            targets = F.pad(targets, (0, inputs.shape[1] - targets.shape[1]), value=self.config.pad_token_id)
            hidden, state = self.model(inputs, state, mask=mask, return_hidden=True, check_ids=False)
            scored = (j + 1 >= first[:, None]) & (j + 1 < lengths[:, None])  # the position predicts token j + 1
            row = torch.arange(B, device=self._device)[:, None].expand(B, inputs.shape[1])[scored]
            h, t = hidden[scored], targets[scored]
            for lo in range(0, t.numel(), self.logits_chunk_tokens):
                logits = self.model.logits(h[lo : lo + self.logits_chunk_tokens]).float()
                tt = t[lo : lo + self.logits_chunk_tokens]
                lp = logits.log_softmax(-1).gather(-1, tt[:, None])[:, 0]
                logprob.index_add_(0, row[lo : lo + tt.numel()], lp.double())
                wrong.index_add_(0, row[lo : lo + tt.numel()], (logits.argmax(-1) != tt).long())
        return logprob.cpu(), (wrong == 0).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, starts = [], []
        for _, context_enc, continuation_enc in requests:
            row = self.with_bos(list(context_enc)) + list(continuation_enc)
            rows.append(row)
            starts.append(len(row) - len(continuation_enc))
        results = self.score(rows, starts, desc="loglikelihood")
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text after the BOS, every token given all before it (no windows: the state
        carries the full context)."""
        texts = [req.args[0] for req in requests]
        rows = [[self.config.bos_token_id, *self.tok_encode(text)] for text in texts]
        results = [lp for lp, _ in self.score(rows, [1] * len(rows), desc="loglikelihood_rolling")]
        for text, lp in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
        return results

    # --- generation ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings run in batches (longest prompts first); each row
        stops at the EOS, a stop string or max_gen_toks, and its text ends before the first stop string."""
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or len(requests) < 2, file=sys.stderr) as bar:
            for members in groups.values():
                members.sort(key=lambda n: -len(requests[n].args[0]))
                gen_kwargs = requests[members[0]].args[1]
                for lo in range(0, len(members), self.batch_size):
                    batch = members[lo : lo + self.batch_size]
                    texts = self.generate_batch([requests[n].args[0] for n in batch], gen_kwargs)
                    for n, text in zip(batch, texts):
                        out[n] = text
                        self.cache_hook.add_partial("generate_until", requests[n].args, text)
                    bar.update(len(batch))
        return out

    def generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_new = kwargs.pop("max_gen_toks")
        sampling = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0) or 0.0)  # normalize_gen_kwargs sets 0.0 without do_sample
        temperature = temperature if sampling else 0.0
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            raise ValueError(f"xlstm7b: unsupported generation argument(s) {sorted(kwargs)}; supported: until, max_gen_toks, "
                             "do_sample, temperature, top_k, top_p")
        stopper = StopStrings(self, len(contexts), until)
        generate(
            self.model, [self.with_bos(self.tok_encode(c)) for c in contexts], max_new_tokens=max_new,
            temperature=temperature, top_k=top_k if temperature else None, top_p=top_p if temperature else None,
            eos_token_id=self.eot_token_id, seed=self.seed if temperature else None, streamer=stopper,
        )
        return stopper.texts()


# Registered by name, not by class: run as `python -m xlstm7b.harness` this file is `__main__` too,
# and both copies register the same name, which lm-eval resolves to this module's class.
model_registry.register("xlstm7b", target="xlstm7b.harness:XLSTMLM")


class StopStrings:
    """A `generate` streamer: collects each row's tokens up to its EOS and stops the batch once every
    row has produced the EOS or one of the stop strings."""

    def __init__(self, lm: XLSTMLM, rows: int, until: list[str]):
        self.lm, self.until = lm, until
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def put(self, tokens: torch.Tensor) -> bool:
        eos = self.lm.eot_token_id
        for b, t in enumerate(tokens.tolist()):
            if self.done[b]:
                continue
            if t == eos:
                self.done[b] = True
                continue
            self.tokens[b].append(t)
            if self.until and any(s in self.lm.tok_decode(self.tokens[b][-64:]) for s in self.until):
                self.done[b] = True
        return all(self.done)

    def end(self) -> None:
        pass

    def texts(self) -> list[str]:
        out = []
        for ids in self.tokens:
            text = self.lm.tok_decode(ids)
            for s in self.until:
                text = text.split(s, 1)[0]
            out.append(text)
        return out


def main() -> None:
    """`python -m xlstm7b.harness ...`: lm-eval's command line with the `xlstm7b` model type registered.
    A bad model argument (a missing folder, a wrong dtype) ends in one line and exit code 2."""
    try:
        cli_evaluate()
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"xlstm7b.harness: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
