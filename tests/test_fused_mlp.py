"""CPU tests of the fused MLP's host side (`kernels/triton_fused_mlp.py`): the grid it picks, the checks of its
operands and tiles, and its plain-torch twin (`reference.rms_norm_mlp`). The kernel itself: test_fused_mlp_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

from r1serve.kernels import reference, triton_fused_mlp
from r1serve.kernels.triton_fused_mlp import FusedMlpConfig, default_num_programs


def busiest_program_bytes(programs: int, blocks1: int, bytes1: int, blocks2: int, bytes2: int) -> int:
    """The weight bytes of the busiest program, dealing blocks the way the kernel's loops do: phase-1 blocks
    pid, pid + P, ...; phase-2 blocks P-1-pid, 2P-1-pid, ..."""
    return max(len(range(pid, blocks1, programs)) * bytes1 + len(range(programs - 1 - pid, blocks2, programs)) * bytes2
               for pid in range(programs))


@pytest.mark.parametrize("shape", [(132, 2240, 24576, 384, 71680), (132, 8960, 6144, 768, 35840),
                                   (114, 560, 98304, 96, 573440), (8, 19, 800, 50, 1200)])
def test_default_grid_has_the_least_loaded_busiest_program(shape: tuple[int, int, int, int, int]) -> None:
    sms, *work = shape
    chosen = default_num_programs(sms, *work)
    assert sms // 2 <= chosen <= sms
    best = min(busiest_program_bytes(p, *work) for p in range(sms // 2, sms + 1))
    assert busiest_program_bytes(chosen, *work) == best, f"{shape}: grid {chosen}"


def test_default_grid_prefers_the_larger_grid_on_a_tie() -> None:
    assert default_num_programs(16, 16, 1, 16, 1) == 16
    assert default_num_programs(16, 8, 1, 0, 1) == 16  # 8 blocks fit any grid of 8-16 in one round


@pytest.mark.parametrize(("config", "message"), [
    (FusedMlpConfig(block_n1=3), "block_n1=3 is not a power of two"),
    (FusedMlpConfig(block_n1=16, chunk=8), "holds no whole phase-1 block"),
    (FusedMlpConfig(block_n1=8, dot1=True), "tensor cores need 16 rows"),
    (FusedMlpConfig(block_n2=4, dot2=True), "tensor cores need 16 rows"),
    (FusedMlpConfig(block_n1=1, chunk=1), "more than 1024 chunks"),
])
def test_configs_it_cannot_run_are_refused_by_name(config: FusedMlpConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        triton_fused_mlp._check_config(config, 8960)


def _operands(m: int, hidden: int = 64, inter: int = 96, dtype: torch.dtype = torch.bfloat16) -> dict:
    return {"x2": torch.zeros(m, hidden, dtype=dtype), "norm_weight": torch.ones(hidden, dtype=dtype),
            "gate_up_weight": torch.zeros(2 * inter, hidden, dtype=dtype),
            "down_weight": torch.zeros(hidden, inter, dtype=dtype)}


@pytest.mark.parametrize(("change", "message"), [
    ({"x2": torch.zeros(9, 64)}, "x has 9 rows, the kernel takes 1..8"),
    ({"x2": torch.zeros(0, 64)}, "x has 0 rows"),
    ({"down_weight": torch.zeros(64, 95, dtype=torch.bfloat16)}, "do not fit x's 64 columns"),
    ({"norm_weight": torch.ones(63, dtype=torch.bfloat16)}, "norm_weight (63,)"),
    ({"gate_up_weight": torch.zeros(64, 192, dtype=torch.bfloat16).t()}, "rows must be contiguous"),
    ({"down_weight": torch.zeros(64, 96, dtype=torch.float16)}, "differ in dtype"),
    ({}, "needs bf16 or fp16 CUDA tensors"),
])
def test_operands_it_cannot_run_are_refused_by_name(change: dict, message: str) -> None:
    operands = _operands(2) | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        triton_fused_mlp._check(**operands, config=FusedMlpConfig(), num_programs=None)


@pytest.mark.parametrize("with_residual", [True, False])
def test_twin_is_the_gate_up_op_then_down_proj(with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen) if with_residual else None
    nw, gate_up, down = torch.rand(32, generator=gen) + 0.5, torch.randn(80, 32, generator=gen), torch.randn(32, 40)
    out, new_res = reference.rms_norm_mlp(x, res, nw, 1e-6, gate_up, down)
    normed = reference.rms_norm(x if res is None else x + res, nw, 1e-6)
    gate, up = (normed @ gate_up.T).split(40, dim=-1)
    torch.testing.assert_close(out, (torch.nn.functional.silu(gate) * up) @ down.T)
    assert torch.equal(new_res, x if res is None else x + res)
