import pytest
import torch

from tasks.train.probe import ProbeError, fit_to_effective, largest_batch


def fake_step(limit):
    calls = []

    def step(b):
        calls.append(b)
        if b > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {b}")
    return step, calls


@pytest.mark.parametrize("limit", [8, 100, 333, 1000, 5000])
def test_largest_batch_finds_the_limit_within_an_eighth(limit):
    step, calls = fake_step(limit)
    b = largest_batch(step, start=8, limit=4096)
    assert b % 8 == 0 and b <= min(limit, 4096)
    assert b >= min(limit, 4096) * 7 / 8 - 8
    assert len(calls) < 20  # doubling + bisection, not a linear scan


def test_nothing_fits_says_what_to_do():
    step, _ = fake_step(0)
    with pytest.raises(ProbeError, match="does not fit in device memory; use a smaller train.model"):
        largest_batch(step)


def test_other_errors_are_not_swallowed():
    def step(b):
        raise ValueError("shape mismatch")
    with pytest.raises(ValueError, match="shape mismatch"):
        largest_batch(step)


def test_fit_to_effective_batch():
    assert fit_to_effective(100, None, 1) == 100
    assert fit_to_effective(100, 256, 2) == 64  # 256 = 64 x 2 devices x 2 accumulation
    assert fit_to_effective(48, 256, 1) == 32
