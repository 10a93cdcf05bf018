"""A short run of examples/train_tiny_lm.py: the tiny GQA transformer trained with
pagedflash attention and, from the same initialization on the same batches, with
PyTorch SDPA. The loss must fall and the two curves must agree to float32 noise
(bfloat16 noise under --bf16 autocast)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_tiny_lm.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16_autocast"])
def test_train_tiny_lm_short(capsys, bf16):
    import pagedflash

    example = load_example()
    threads = torch.get_num_threads(), pagedflash._C.get_num_threads()
    try:  # the script sets both libraries' thread counts; give them back afterwards
        res = example.main(["--steps", "80", "--print-every", "20"] + (["--bf16"] if bf16 else []))
    finally:
        torch.set_num_threads(threads[0])
        pagedflash.set_num_threads(threads[1])
    printed = capsys.readouterr().out
    assert "pagedflash" in printed and "sdpa" in printed and "max |loss_pagedflash - loss_sdpa|" in printed
    pf, ref = res["pagedflash"], res["sdpa"]
    assert len(pf) == len(ref) == 80
    assert all(math.isfinite(x) for x in pf + ref)
    # the loss falls: the last ten steps sit clearly below the first step
    tail = sum(pf[-10:]) / 10
    assert tail < pf[0] - 0.2, (pf[0], tail)
    # identical initialization and data: the curves agree to float32 (bfloat16) noise
    assert pf[0] == pytest.approx(ref[0], abs=1e-3 if bf16 else 1e-6)
    assert res["max_diff"] < (2e-2 if bf16 else 1e-3), res["max_diff"]
