"""Test setup and the helpers the test modules share (`from conftest import rel_err, ...`).

Without a CUDA device, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set
before any @triton.jit function is defined, so this happens at import time, before the test modules
import the kernels.
"""

import ctypes
import importlib.util
import os
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the working directory first on sys.path. From the checkout's root, its
# folder kernels/ (installed as xlstm7b.kernels) would then shadow the PyPI package `kernels`, which
# transformers imports; the tests run the installed project, so the root comes off the path.
CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != CHECKOUT]

HAS_CUDA = torch.cuda.is_available()

from xlstm7b import XLSTM, ModelConfig, State, generate, save_pretrained  # noqa: E402  (after TRITON_INTERPRET)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second OpenMP thread only adds waiting, which on a loaded
    2-core machine stalls every small op for milliseconds (a 11k-step decoding test took 90 s
    instead of 7). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str, monkeypatch) -> types.ModuleType:
    """benchmarks/NAME.py as a module. The scripts put benchmarks/ first on sys.path to import their
    neighbours, where benchmarks/kernels.py would shadow the PyPI package `kernels`: monkeypatch
    restores the path when the test ends."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", CHECKOUT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- comparing results ----------------------------------------------------------------------------

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
"""Default relative error of a result computed in this dtype against its reference, where the
computation is the same function up to summation order."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None, what: str = "") -> None:
    """rel_err(actual, expected) <= tol (default: TOL[actual.dtype]), with the error in the message."""
    tol = TOL[actual.dtype] if tol is None else tol
    err = rel_err(actual, expected)
    assert err <= tol, f"{what or 'tensor'} differs: rel err {err:.2e} > {tol:.0e}"


def assert_states_close(a: State, b: State, tol: float = 1e-4) -> None:
    for la, lb in zip(a, b):
        for name, x, y in zip("Cnm", la, lb):
            assert_rel_close(x, y, tol, f"state {name}")


# --- models and prompts ---------------------------------------------------------------------------

def perturb(model: XLSTM, scale: float, seed: int | None = None) -> XLSTM:
    """Adds scale * N(0, 1) to every parameter, in place (drawn from a generator seeded with `seed`,
    or from torch's global RNG). The release init zeroes the gate and output-gate weights; perturbed
    weights exercise every path: gates that vary per token, a stabilizer m that moves."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))  # drawn on the CPU: the same on any device
    return model


def random_model(config: ModelConfig, seed: int = 0) -> XLSTM:
    """A model in eval mode with strongly perturbed weights (scale 0.3), for decoding tests."""
    torch.manual_seed(seed)
    return perturb(XLSTM(config).eval(), 0.3)


def prompt(n: int, seed: int) -> list[int]:
    """n random ids of the debug preset's vocabulary (none of the special ids 0 and 1)."""
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- decoding memory ------------------------------------------------------------------------------

def heap_bytes_in_use() -> int:
    """Bytes allocated through glibc malloc in all arenas (torch's CPU tensors live there)."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to measure heap use")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def decoding_heap_growth(model, n: int, **kwargs) -> int:
    """Peak heap growth while generating n tokens, measured at every step from the first one on
    (after the prefill and the [B, n] output buffer). The probe keeps two ints only, so it
    allocates nothing itself."""
    first, peak = None, 0

    def probe(tokens):
        nonlocal first, peak
        now = heap_bytes_in_use()
        first = now if first is None else first
        peak = max(peak, now)

    generate(model, [[0, 5, 9]], max_new_tokens=n, temperature=1.0, seed=0, streamer=probe, **kwargs)
    return peak - first


# --- a saved model with a tokenizer ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|padding|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "a stop sign"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tokenizer):
    """A saved debug-shape model with its tokenizer.json."""
    config = ModelConfig.from_preset("debug").replace(vocab_size=tokenizer.get_vocab_size())
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(random_model(config, seed=1), path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


# --- training: a corpus and a token cache shared by the training test modules ---------------------

@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small code corpus: 40 standard-library modules."""
    root = tmp_path_factory.mktemp("corpus")
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for f in src:
        (root / f.name).write_text(f.read_text(encoding="utf-8", errors="replace")[:20000])
    return root


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
