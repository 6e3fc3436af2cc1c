"""Shared fixtures: the standard fact world and the small models that know it (trained once, cached on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_unlearn.testing import fact_world
from peft_unlearn.testing.fact_model import single_thread

TOFU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny forwards: on a shared 2-core machine two threads contend with
    every other process and run several times slower."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def world():
    """50 subjects to forget (one edit each) and 25 subjects (100 facts) to keep."""
    return fact_world()


@pytest.fixture(scope="session")
def trained_models(world):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = world.train_model(arch, progress=False)
        return cache[arch]

    return get


@pytest.fixture
def fresh_model(trained_models):
    """A private copy of a trained fact model (tests may wrap and edit it freely)."""

    def get(arch: str):
        import copy

        model, tokenizer = trained_models(arch)
        return copy.deepcopy(model), tokenizer

    return get


@pytest.fixture(scope="session")
def tofu_dir():
    if not TOFU_DIR.is_dir():
        pytest.skip(f"TOFU sample not found at {TOFU_DIR}")
    return TOFU_DIR


def counterfactual_requests(world, facts):
    """Edits giving each fact another person's answer to the same kind of question (a new target the model could
    give, unlike a refusal)."""
    import peft_unlearn as pu

    return [pu.EditRequest(f.question, next(o.answer for o in world.facts
                                            if o.relation == f.relation and o.answer != f.answer), f.subject)
            for f in facts]


def tiny_llama(vocab_size: int = 64, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int = 64, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()
