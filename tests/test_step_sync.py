"""A decoding step never reads a tensor's value on the host: `XLSTM.step` (with active rows, slot
indices and cell inputs) and the step the serving engine runs per decode iteration, on CPU under a
dispatch mode that refuses every host read, and on CUDA under the sync debug mode."""

import pytest
import torch

from conftest import random_model
from test_train_step import HostReadError, NoHostReads
from xlstm7b import ModelConfig, State
from xlstm7b.serve import Engine, EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_preset("debug"))


def test_the_host_read_guard_catches_a_read(model):
    """The guard is live: a value read inside it fails (else the tests below could not fail)."""
    with NoHostReads(), pytest.raises(HostReadError):
        torch.ones(2).sum().item()
    with NoHostReads(), pytest.raises(HostReadError):
        bool(torch.ones(2).sum() > 0)


def test_model_step_reads_nothing_on_the_host(model):
    """Active rows, slot indices into a larger pool and the cell-inputs buffer: all on the device."""
    pool = State.zeros(model.config, 5)
    token, active, slots = torch.tensor([3, 4, 5]), torch.tensor([True, False, True]), torch.tensor([4, 0, 2])
    cell_inputs = model.cell_inputs_buffer(3)
    with torch.no_grad(), NoHostReads():
        logits = model.step(token, pool, active, cell_inputs, slots)
        model.step(token, State.zeros(model.config, 3))
    assert logits.shape == (3, model.config.vocab_size)


def test_the_engines_decode_step_reads_nothing_on_the_host(model):
    """The runner `Engine._decode_step` calls, as it calls it: a bucket of tokens, the active mask and
    the slots (padding on the scratch row); the sampling after it reads the logits by design."""
    engine = Engine(model, EngineConfig(max_batch=4, state_dtype=torch.float32))
    bucket = engine.buckets[-1]
    token = torch.full((bucket,), 7)
    active = torch.arange(bucket) < 2
    slots = torch.tensor([1, 0] + [engine.scratch] * (bucket - 2))
    step = engine._runner(bucket)
    with torch.no_grad(), NoHostReads():
        logits = step(token, active, slots)
    assert logits.shape == (bucket, model.config.vocab_size)


@pytest.mark.gpu
def test_a_cuda_decoding_step_never_synchronizes():
    """On CUDA (bf16 weights, Triton step kernel, slots): the eager step under the sync debug mode."""
    m = random_model(ModelConfig.from_preset("debug")).cuda().to(torch.bfloat16)
    pool = State.zeros(m.config, 5, device="cuda")
    token, active, slots = (torch.tensor(x, device="cuda") for x in ([3, 4, 5], [True, False, True], [4, 0, 2]))
    with torch.no_grad():
        m.step(token, pool, active, None, slots)  # outside the check: the kernels compile on first launch
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m.step(token, pool, active, None, slots)
        finally:
            torch.cuda.set_sync_debug_mode("default")
