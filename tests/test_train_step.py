"""What runs inside a training step on CPU: no host reads inside the model, the optimizer's
implementation and its log line, and the compiled blocks' graphs."""

import contextlib
import dataclasses
import re

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

from xlstm7b import XLSTM, ModelConfig
from xlstm7b.model import check_token_ids
from xlstm7b.train import trainer
from xlstm7b.train.config import load_config
from xlstm7b.train.data import TokenData, prepare_data
from xlstm7b.train.optim import build_optimizer, describe, optimizer_impl
from xlstm7b.train.parallel import Dist, build_model, compile_blocks
from test_train import job

pytestmark = pytest.mark.usefixtures("one_thread")


class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Fails on every read of a tensor's value by the host: `.item()`, `bool(t)`, `int(t)` (all
    aten._local_scalar_dense) and, patched for the block, Tensor.item, .tolist and .cpu (a copy to
    the host that on CUDA waits for the device)."""

    def __enter__(self):
        self.patches = contextlib.ExitStack()
        for name in ("item", "tolist", "cpu"):
            self.patches.enter_context(pytest.MonkeyPatch.context()).setattr(torch.Tensor, name, self.refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        self.patches.close()
        return super().__exit__(*exc)

    @staticmethod
    def refuse(name):
        def method(*args, **kwargs):
            raise HostReadError(f"Tensor.{name}() inside a training step")
        return method

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostReadError("a tensor's value read by the host (.item(), bool(), int()) inside a training step")
        return func(*args, **(kwargs or {}))


def debug_model(**train):
    """The debug preset built as the trainer builds it; keys are train.KEY, or SECTION.KEY in full."""
    j = load_config("debug", [f"--{k if '.' in k else 'train.' + k}={v}" for k, v in train.items()])
    model, plain, _ = build_model(j.model, j.train, Dist(), seed=0)
    return j, model, plain


def batch(vocab: int, B=2, S=40, seed=0):
    ids = torch.randint(1, vocab, (B, S + 1), generator=torch.Generator().manual_seed(seed))
    ids[:, ::13] = 0
    return ids[:, :-1], ids[:, 1:], ids[:, :-1] == 0


@pytest.mark.parametrize("backend,chunk", [("torch", 0), ("torch", 16), ("triton", 0)],
                         ids=["whole-loss", "loss-in-pieces", "triton-kernels"])
def test_a_training_step_reads_no_value_back_to_the_host(backend, chunk):
    """Forward and backward of the model and the loss, with activation checkpointing, on the
    PyTorch mLSTM and on the Triton kernels (here in Triton's interpreter)."""
    j, model, plain = debug_model(activation_checkpointing="true", **{"model.mlstm_backend": f'"{backend}"'})
    inputs, targets, reset = batch(j.model.vocab_size, S=40 if backend == "torch" else 16)
    with NoHostReads():
        loss = trainer.sequence_loss(model, plain.logits, inputs, targets, reset, contextlib.nullcontext(), chunk).mean()
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_plain_forward_checks_the_ids_and_the_check_is_the_only_read():
    _, model, _ = debug_model()
    ids = torch.tensor([[1, 2, 512]])
    with pytest.raises(ValueError, match=r"token id 512 outside the vocabulary \[0, vocab_size=512\)"):
        model(ids)
    with pytest.raises(ValueError, match="token id -3 outside"):
        check_token_ids(torch.tensor([[-3, 4]], dtype=torch.int32), 512)
    with NoHostReads(), pytest.raises(HostReadError):
        model(ids % 512)
    with NoHostReads():
        model(ids % 512, check_ids=False)


def test_training_ids_are_checked_once_where_they_enter(tmp_path, corpus, cache):
    """The trainer's steps leave the ids unchecked because TokenData checks every token of a split
    against the model's vocabulary when it opens it."""
    j = job(corpus, cache, tmp_path / "r")
    folder, _, _ = prepare_data(j.data, j.model)
    data = TokenData(folder, "train", 32, 0, j.model.vocab_size)
    top = max(int(s.max()) for s in data.shards)
    assert 0 < top < j.model.vocab_size
    with pytest.raises(ValueError, match=f"token id {top} in .* exceeds model.vocab_size={top}"):
        TokenData(folder, "train", 32, 0, top)


def test_the_optimizer_implementation_is_chosen_by_device():
    assert optimizer_impl("auto", {"cuda"}) == "fused"
    assert optimizer_impl("auto", {"cpu"}) == "foreach"  # CPU, and cpu_offload's host copies
    assert optimizer_impl("auto", {"cuda", "cpu"}) == "foreach"
    assert optimizer_impl("loop", {"cuda"}) == "loop"
    _, model, _ = debug_model()
    assert describe(build_optimizer(model, load_config("debug").train)) == "AdamW (foreach)"
    with pytest.raises(ValueError, match="optimizer_impl"):
        load_config("debug", ["--train.optimizer_impl=apex"])


def test_every_optimizer_implementation_gives_the_same_training():
    """Three steps from the same weights: foreach gives the tensor-by-tensor loop's weights exactly,
    fused up to float rounding."""
    weights = {}
    for impl in ("loop", "foreach", "fused"):
        j, model, plain = debug_model(optimizer_impl=f'"{impl}"')
        optimizer = build_optimizer(model, j.train)
        assert describe(optimizer) == f"AdamW ({impl})"
        for step in range(3):
            inputs, targets, reset = batch(j.model.vocab_size, seed=step)
            trainer.sequence_loss(model, plain.logits, inputs, targets, reset, contextlib.nullcontext()).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in debug_model()[1].parameters()])
    moved = (weights["loop"] - start).norm()
    assert moved > 0
    # On CPU foreach computes every tensor's update with the loop's operations in the loop's order:
    # the same bits, so the CPU loss curves of earlier runs (which used the loop) are unchanged.
    assert torch.equal(weights["foreach"], weights["loop"])
    assert (weights["fused"] - weights["loop"]).norm() <= 1e-5 * moved


def test_the_trainer_logs_its_optimizer(tmp_path, corpus, cache, capsys):
    assert trainer.train(job(corpus, cache, tmp_path / "r", "--train.steps=1")) == 0
    assert re.search(r"training .*, AdamW \(foreach\)", capsys.readouterr().out)


def test_compiled_blocks_keep_each_mlstm_kernel_one_node():
    """train.compile's graphs (compile_blocks, with a backend that records what AOTAutograd hands
    Inductor): one graph per block and per direction, no graph break, and the Triton mLSTM forward
    and backward (run here in Triton's interpreter) each a single opaque node."""
    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    config = dataclasses.replace(ModelConfig.from_preset("debug"), mlstm_backend="triton")
    torch.manual_seed(0)
    model = XLSTM(config)
    compile_blocks(model, aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")))
    torch._dynamo.reset()
    logits, _ = model(torch.randint(0, 512, (1, 16)), check_ids=False)
    logits.sum().backward()
    ops = {kind: [[str(n.target) for n in gm.graph.nodes if n.op == "call_function"] for gm in gms] for kind, gms in graphs.items()}
    # The two blocks run the same code: Dynamo reuses the first block's graph for the second.
    assert len(ops["forward"]) == len(ops["backward"]) == 1, ops
    assert sum("mlstm_chunkwise_fwd" in t for t in ops["forward"][0]) == 1
    assert sum("mlstm_chunkwise_bwd" in t for t in ops["backward"][0]) == 1
    assert not any("triton" in t for kind in ops.values() for g in kind for t in g)  # no kernel internals traced


@pytest.mark.gpu
def test_a_cuda_training_step_never_synchronizes():
    """On CUDA (bf16 autocast, Triton kernels, fused AdamW): forward, backward, clipping and the
    optimizer step run with CUDA's sync debug mode set to raise on any synchronizing call."""
    j = load_config("debug")
    model, plain, _ = build_model(j.model, j.train, Dist(device=torch.device("cuda")), seed=0)
    optimizer = build_optimizer(model, j.train)
    assert describe(optimizer) == "AdamW (fused)"
    inputs, targets, reset = (t.cuda() for t in batch(j.model.vocab_size, S=64))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        trainer.sequence_loss(model, plain.logits, inputs, targets, reset, autocast).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # outside the check: the kernels' autotuning times them, and the optimizer state is allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
