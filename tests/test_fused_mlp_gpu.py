"""GPU tests of `kernels/triton_fused_mlp.fused_mlp` (the MLP half of a layer in one launch) against the chain
the model runs today (`triton_linear.rms_norm_gate_up`, then `triton_linear.linear`) and the plain-torch twin
(`reference.rms_norm_mlp`, computed in float32 on upcast copies).

Tolerance: bf16, not bit-exact. The kernel rounds where the chain rounds (gate and up, SiLU, the product), but its
float32 sums run in another order (its down_proj sums `chunk`-column chunks, the chain's 2048-column ones or
cuBLAS's), and a one-ulp difference in a rounded gate/up value moves the output by up to an ulp of the product.
So the output's relative error ‖out − ref‖ / ‖ref‖ against the float32 twin and against the chain is < 1e-2 (what
bf16 operands give), and the new residual (one rounded add, as in the chain) is exact. Bit-exact, and asserted
so: repeated calls, CUDA-graph replays and the two-launch mode (phase 1 and phase 2 without flags) against the
one-launch kernel, since they run the same sums in the same order; a chunk read before its flag said it was
complete would differ. Every assertion names the shape and config. Outputs are poisoned with NaN first (a freed
NaN block the allocator hands back next). Marked `gpu`; `dev/interpret_kernels.py fused_mlp` runs the two-launch
cases on a CPU through Triton's interpreter in float32.
"""
from __future__ import annotations

import pytest
import torch

from r1serve.kernels import reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16
BF16_TOL = 1e-2
F32_TOL = 1e-5  # the interpreter's float32 runs: only the sums' order differs from the twin
EPS = 1e-6
MODEL_SHAPE = (1536, 8960)  # (hidden, intermediate) of the 1.5B model
ODD_SHAPE = (200, 300)  # partial row blocks, a partial last chunk, more programs than phase-2 blocks


def _module():  # imported inside the tests, so that collection works without Triton
    from r1serve.kernels import triton_fused_mlp

    return triton_fused_mlp


def _configs() -> dict[str, object]:
    """Configs of every form: FMA, tensor cores in either phase, one-row blocks, chunks of several sizes."""
    cfg = _module().FusedMlpConfig
    return {"default": cfg(), "fma-small": cfg(1, 2, 128, warps=4), "fma-wide": cfg(8, 8, 512, warps=8),
            "dot2": cfg(2, 16, 256, dot2=True, warps=4), "dot-both": cfg(16, 16, 1024, dot1=True, dot2=True)}


def mlp_case(m: int, shape: tuple[int, int], with_residual: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Random inputs of the real scale: weights ~ N(0, 1/K), so every activation is O(1)."""
    hidden, inter = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*s: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*s, generator=gen) * scale).to(DEVICE, DTYPE)

    return {"x": randn(m, hidden), "residual": randn(m, hidden) if with_residual else None,
            "norm_weight": (torch.rand(hidden, generator=gen) + 0.5).to(DEVICE, DTYPE),
            "gate_up": randn(2 * inter, hidden, scale=hidden ** -0.5),
            "down": randn(hidden, inter, scale=inter ** -0.5)}


def run_fused(case: dict, config=None, num_programs: int | None = None, two_launches: bool | None = None):
    return _module().fused_mlp(case["x"], case["residual"], case["norm_weight"], EPS, case["gate_up"], case["down"],
                               num_programs=num_programs, config=config, two_launches=two_launches)


def twin(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm_mlp` in float32 on upcast copies."""
    up = {k: (v.float() if v is not None else None) for k, v in case.items()}
    return reference.rms_norm_mlp(up["x"], up["residual"], up["norm_weight"], EPS, up["gate_up"], up["down"])


def chain(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops the model runs today: the norm-fused gate/up product + SiLU kernel, then down_proj's `linear`."""
    from r1serve.kernels import triton_linear

    act, residual = triton_linear.rms_norm_gate_up(case["x"], case["residual"], case["norm_weight"], EPS,
                                                   case["gate_up"])
    return triton_linear.linear(act, case["down"]), residual


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output (an element was left unwritten?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def poison_next_allocations(*shapes: tuple[int, ...]) -> None:
    """Fill blocks of these shapes with NaN and free them: the caching allocator hands them out next."""
    blocks = [torch.full(shape, float("nan"), dtype=DTYPE, device=DEVICE) for shape in shapes]
    del blocks


def check_fused_mlp(m: int, shape: tuple[int, int], with_residual: bool, name: str, num_programs: int | None = None,
               two_launches: bool | None = None) -> None:
    """One call against the twin (and, on CUDA, the chain); the residual exactly."""
    what = f"M={m} hidden, inter={shape} residual={with_residual} config={name} programs={num_programs}"
    case = mlp_case(m, shape, with_residual, seed=m * 7 + shape[0])
    poison_next_allocations((m, shape[1]), (m, shape[0]), (m, shape[0]))
    out, res = run_fused(case, _configs()[name], num_programs, two_launches)
    ref_out, _ = twin(case)
    assert out.shape == (m, shape[0]) and out.dtype == DTYPE, what
    tol = F32_TOL if DTYPE == torch.float32 else BF16_TOL
    assert rel_err(out, ref_out) < tol, f"{what}: against the float32 twin"
    if with_residual:
        assert torch.equal(res, case["x"] + case["residual"]), f"{what}: new residual"
    else:
        assert res is case["x"], f"{what}: without a residual the stream is x itself"
    if DEVICE == "cuda":
        chain_out, _ = chain(case)
        assert rel_err(out, chain_out) < BF16_TOL, f"{what}: against the chain"
        assert _module().read_status(out.device) == 0, f"{what}: a wait gave up"


@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", [MODEL_SHAPE, ODD_SHAPE], ids=["model", "odd"])
def test_fused_mlp_matches_chain_and_twin(m: int, with_residual: bool, shape: tuple[int, int]) -> None:
    for name in _configs():
        check_fused_mlp(m, shape, with_residual, name)


@pytest.mark.parametrize("num_programs", [1, 7, 64])
def test_any_grid_gives_the_same_result(num_programs: int) -> None:
    """Each output element is summed by one program in a fixed order, whichever program that is: any grid (one
    program, a grid that divides nothing) gives the default grid's result bit for bit."""
    case = mlp_case(2, MODEL_SHAPE, True, seed=1)
    expected, _ = run_fused(case)
    out, _ = run_fused(case, num_programs=num_programs)
    assert torch.equal(out, expected), f"programs={num_programs}: differs from the default grid"


@pytest.mark.parametrize("name", ["default", "fma-small", "dot-both"])
def test_one_launch_equals_two_launches_bit_for_bit(name: str) -> None:
    """The flags only order the phases: with them (one launch) and without (two launches) the sums are the same,
    so the outputs are equal bit for bit, call after call (a chunk read too early would differ)."""
    mod = _module()
    case = mlp_case(3, MODEL_SHAPE, True, seed=2)
    two, two_res = run_fused(case, _configs()[name], two_launches=True)
    for i in range(20):
        one, one_res = run_fused(case, _configs()[name], two_launches=False)
        assert torch.equal(one, two) and torch.equal(one_res, two_res), f"config={name}, call {i}"
    flags = mod.flags_workspace(one.device)
    assert flags[:mod.MAX_CHUNKS + 1].count_nonzero() == 0, f"config={name}: counters or exit ticket left set"
    assert mod.read_status(one.device) == 0, f"config={name}: a wait gave up"


def test_cuda_graph_replays_equal_eager_and_reset_the_flags() -> None:
    """Three layers' MLPs captured back to back (the next one's launch overlaps this one's tail with PDL),
    replayed twice on new inputs: equal to eager calls, and the counters back at zero."""
    mod = _module()
    cases = [mlp_case(2, MODEL_SHAPE, True, seed=10 + i) for i in range(3)]
    for case in cases:
        run_fused(case)  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run_fused(case) for case in cases]
    for replay in range(2):
        for case in cases:
            case["x"].copy_(torch.randn_like(case["x"]))
        graph.replay()
        torch.cuda.synchronize()
        for i, case in enumerate(cases):
            eager, eager_res = run_fused(case)
            assert torch.equal(outs[i][0], eager) and torch.equal(outs[i][1], eager_res), f"replay {replay}, layer {i}"
    assert mod.flags_workspace(cases[0]["x"].device)[:mod.MAX_CHUNKS + 1].count_nonzero() == 0
    assert mod.read_status(cases[0]["x"].device) == 0


def test_fused_mlp_rejects_what_it_cannot_run() -> None:
    mod = _module()
    case = mlp_case(2, ODD_SHAPE, False)
    bad = {"9 rows": (dict(case, x=torch.zeros(9, 200, device=DEVICE, dtype=DTYPE)), {}, "x has 9 rows"),
           "shapes": (dict(case, down=case["down"][:, :299]), {}, "do not fit"),
           "chunk": (case, {"config": mod.FusedMlpConfig(block_n1=8, chunk=4)}, "no whole phase-1 block"),
           "dot": (case, {"config": mod.FusedMlpConfig(block_n2=8, dot2=True)}, "tensor cores need 16 rows"),
           "grid": (case, {"num_programs": 100_000}, "every program must be resident")}
    for what, (inputs, kwargs, message) in bad.items():
        try:
            run_fused(inputs, **kwargs)
        except ValueError as e:
            assert message in str(e), f"{what}: {e}"
        else:
            raise AssertionError(f"{what}: accepted")
