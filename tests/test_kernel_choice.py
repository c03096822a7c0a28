"""Kernels chosen by measurement (core.choice): every candidate is exact enough against float64, the choice
keeps the default unless another is clearly faster, is remembered per machine, and is never measured under
torchrun."""

import time

import pytest
import torch

from optq.core import choice
from optq.core.hessian import HessianAccumulator, _bf16_gram_kernels, _cross_kernels, _symmetric
from optq.runtime import native


@pytest.fixture(autouse=True)
def fresh_choices(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTQ_KERNELS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    native.load()  # the native gram kernel among the candidates where the CPU has it
    choice.forget()
    choice.remember_in(tmp_path / "choices.json")
    yield
    choice.forget()
    choice.remember_in(None)


def bf16_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["native-bf16", "torch-bf16-upper", "torch-bf16-full"])
def test_every_gram_kernel_matches_float64(name):
    kernels = _bf16_gram_kernels()
    if name not in kernels:
        pytest.skip(f"{name} does not run on this CPU")
    x = bf16_inputs(300, 200, 1)
    acc = torch.zeros(200, 200)
    kernels[name](acc, x)
    kernels[name](acc, x)  # sums across calls
    ref = 2 * x.double().T @ x.double()
    got = _symmetric(acc).double()
    assert (got - ref).abs().max() / ref.abs().max() < 1e-6


@pytest.mark.parametrize("name", ["float32", "torch-bf16-split"])
def test_every_cross_kernel_matches_float64_and_adds_zero_without_drift(name):
    x = bf16_inputs(300, 64, 2).float()
    x_ref = x + 0.01 * torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    acc = torch.zeros(64, 64)
    _cross_kernels(True)[name](acc, x_ref - x, x)
    ref = (x_ref.double() - x.double()).T @ x.double()
    assert (acc.double() - ref).abs().max() / ref.abs().max() < 1e-4
    zero = torch.zeros(64, 64)
    _cross_kernels(True)[name](zero, torch.zeros_like(x), x)
    assert torch.count_nonzero(zero) == 0


def test_bf16_accumulator_without_drift_has_a_zero_cross_term():
    x = bf16_inputs(256, 48, 4)
    acc = HessianAccumulator(48, asymmetric=True)
    acc.add(x, x_ref=x.clone())
    assert torch.count_nonzero(acc.cross_term()) == 0


def timed(ms):
    return lambda: time.sleep(ms / 1e3)


def test_the_default_stays_unless_another_is_clearly_faster(tmp_path):
    assert choice.fastest("op", (1,), ["a", "b"], lambda: {"a": timed(4), "b": timed(3.8)}) == "a"
    assert choice.fastest("op", (2,), ["a", "b"], lambda: {"a": timed(12), "b": timed(1)}) == "b"
    assert choice.choices()["op 2"]["chosen"] == "b"


def test_a_choice_is_remembered_and_not_measured_again():
    assert choice.fastest("op", (3,), ["a", "b"], lambda: {"a": timed(12), "b": timed(1)}) == "b"
    choice.forget()  # a new process on the same machine

    def measuring():
        raise AssertionError("measured again")

    assert choice.fastest("op", (3,), ["a", "b"], measuring) == "b"


def test_optq_kernels_default_ignores_what_was_remembered(monkeypatch):
    assert choice.fastest("op", (5,), ["a", "b"], lambda: {"a": timed(12), "b": timed(1)}) == "b"
    monkeypatch.setenv("OPTQ_KERNELS", "default")
    assert choice.fastest("op", (5,), ["a", "b"], lambda: {}) == "a"


def test_under_torchrun_nothing_is_measured(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")

    def measuring():
        raise AssertionError("measured under torchrun")

    assert choice.fastest("op", (4,), ["a", "b"], measuring) == "a"


def test_an_accumulator_gives_the_same_hessian_whichever_kernel_it_chose(monkeypatch):
    x = bf16_inputs(512, 96, 5)
    results = []
    for forced in ("default", None):
        choice.forget()
        if forced:
            monkeypatch.setenv("OPTQ_KERNELS", forced)
        else:
            monkeypatch.delenv("OPTQ_KERNELS")
        acc = HessianAccumulator(96)
        acc.add(x)
        results.append(acc.hessian().double())
    assert (results[0] - results[1]).abs().max() / results[0].abs().max() < 1e-6
