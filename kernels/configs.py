"""Every kernel's tiles, as a function of the card (kernels/cards.py) and, for the GEMMs, the element size.

GEMM kernels (the fused 1x1's forward and backward) are tuned: `candidates(kernel, card, ...)` lists the
tile configs the tuner (kernels/tuning.py) times on that card. The elementwise and statistics kernels
take one fixed tile per card: `tiles(kernel, card)`.

Per card family:
  hopper   (sm_90 H100/H200, sm_100 B200: 227 KiB shared memory per block) 128x128 and 128x256 tiles
           with 64-wide K steps keep the tensor cores fed at 3-4 pipeline stages; small tiles serve the
           7x7 and 14x14 stages, where M*N is small.
  ampere   (sm_80 A100: 163 KiB) Hopper-like shapes at 3 stages, with narrower K steps where 64 does
           not fit beside fp32 weights, and mid-size tiles that fit fp32 (TF32) operands.
  small    (sm_89 L4/L40S/RTX 4090, sm_120 RTX 5090: 99 KiB) narrower K steps and 2-3 stages, with fp32
           variants that fit (an fp32 128x128x64 tile at 4 stages needs 256 KiB).
  interpreter  one small config per kernel (every program costs Python time), which still leaves tails
           in the tests' shapes.
A config whose estimated shared memory (shared_bytes: an upper bound of what triton compiles it to) exceeds
the card's is dropped for that element size; the smallest always stays, so every kernel has a config on
every card (the compile check, tests/_triton_aot.py --arch, compiles the configs for every card, fails
when no config of a kernel variant fits or when candidates() offers one that does not, and reports the
real usage).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cards import Card

__all__ = ["Tile", "candidates", "tiles", "shared_bytes", "TUNED_KERNELS", "FAMILY_CONFIGS", "min_param",
           "all_configs"]


@dataclass(frozen=True)
class Tile:
    """One launch configuration: tile constexprs and the launch options."""
    params: tuple            # ((name, value), ...) of the tile constexprs, e.g. BLOCK_M
    num_warps: int = 4
    num_stages: int = 1
    name: str = field(default="", compare=False)

    def __getitem__(self, key):
        return dict(self.params)[key]

    @property
    def kwargs(self):
        """The launch's keyword arguments: tile constexprs, num_warps and num_stages."""
        return dict(self.params, num_warps=self.num_warps, num_stages=self.num_stages)


def _tile(bm, bn, bk, warps, stages, group_m=None):
    params = [("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)]
    if group_m is not None:
        params.append(("GROUP_M", group_m))
    name = f"{bm}x{bn}x{bk}-w{warps}-s{stages}" + (f"-g{group_m}" if group_m is not None else "")
    return Tile(tuple(params), warps, stages, name)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per kernel and card family. Tile roles:
#   forward  BLOCK_M rows x BLOCK_N output channels, reduction over BLOCK_K input channels
#   reduce   BLOCK_N output x BLOCK_K input channels (dW's tile; dz's sums for that N tile), over BLOCK_M
#            rows per step (backward pass 1)
#   dz, dgrad  BLOCK_M rows x BLOCK_K input channels, reduction over BLOCK_N output channels
_HOPPER = {
    "bn_relu_conv1x1_fwd": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                            (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)],
    "bn_relu_conv1x1_bwd_dz": [(128, 64, 128, 8, 3), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4),
                               (64, 64, 64, 4, 4), (128, 32, 128, 8, 4), (64, 32, 64, 4, 2)],
    "bn_relu_conv1x1_bwd_reduce": [(64, 128, 128, 8, 3), (64, 256, 64, 8, 2), (64, 128, 64, 4, 3),
                                   (64, 64, 128, 4, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
    "bn_relu_conv1x1_bwd_dgrad": [(128, 64, 128, 8, 3), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4),
                                  (64, 64, 64, 4, 4), (128, 32, 128, 8, 4), (64, 32, 64, 4, 2)],
}
_SMALL = {
    "bn_relu_conv1x1_fwd": [(128, 128, 32, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                            (64, 64, 64, 4, 3), (64, 64, 32, 4, 2)],
    "bn_relu_conv1x1_bwd_dz": [(128, 64, 64, 4, 3), (64, 64, 64, 4, 3), (128, 32, 64, 4, 3),
                               (64, 32, 64, 4, 2)],
    "bn_relu_conv1x1_bwd_reduce": [(64, 128, 64, 4, 2), (64, 64, 128, 4, 2), (64, 64, 64, 4, 3),
                                   (32, 64, 64, 4, 2)],
    "bn_relu_conv1x1_bwd_dgrad": [(128, 64, 64, 4, 2), (64, 64, 64, 4, 3), (128, 32, 64, 4, 3),
                                  (64, 32, 64, 4, 2)],
}
# A100 (163 KiB): the Hopper shapes that fit with fp32 weights (autocast) at 3 stages, narrower K steps
# where 64 does not, and mid-size tiles that still fit fp32 (TF32) operands.
_AMPERE = {
    "bn_relu_conv1x1_fwd": [(128, 256, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4),
                            (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3)],
    "bn_relu_conv1x1_bwd_dz": [(128, 64, 128, 8, 3), (128, 64, 64, 4, 3), (64, 64, 128, 4, 3),
                               (64, 64, 64, 4, 3), (128, 32, 128, 8, 3), (64, 32, 64, 4, 2)],
    "bn_relu_conv1x1_bwd_reduce": [(64, 128, 128, 8, 2), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3),
                                   (64, 64, 128, 4, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 2)],
    "bn_relu_conv1x1_bwd_dgrad": [(128, 64, 128, 8, 3), (128, 64, 64, 4, 3), (64, 64, 128, 4, 3),
                                  (64, 64, 64, 4, 3), (128, 32, 128, 8, 3), (64, 32, 64, 4, 2)],
}
_INTERPRETER = {
    "bn_relu_conv1x1_fwd": [(32, 32, 16, 4, 1)],
    "bn_relu_conv1x1_bwd_dz": [(32, 32, 16, 4, 1)],
    "bn_relu_conv1x1_bwd_reduce": [(32, 32, 16, 4, 1)],
    "bn_relu_conv1x1_bwd_dgrad": [(32, 32, 16, 4, 1)],
}
FAMILY_CONFIGS = {"hopper": _HOPPER, "ampere": _AMPERE, "small": _SMALL, "interpreter": _INTERPRETER}
# Kernels with a GROUP_M swizzle (grouped program order), per family.
_GROUP_M = {"bn_relu_conv1x1_fwd": 8, "bn_relu_conv1x1_bwd_dz": 8, "bn_relu_conv1x1_bwd_dgrad": 8}
_GROUP_M_INTERPRETER = 4
TUNED_KERNELS = tuple(_HOPPER)


# The estimate follows what triton (3.6 and 3.8) allocates for these kernels, read from their compiled
# shared memory on sm_80, sm_89, sm_90, sm_100 and sm_120 (tests/_triton_aot.py --arch, report
# "shared_memory"): each global load inside the K loop is pipelined through num_stages - 1 buffers of
# its own dtype (the weight is an fp32 parameter under autocast: 4 bytes whatever the compute dtype);
# each MMA operand computed in registers that the MMA reads from shared memory (the weight rounded to the
# compute dtype, relu(bn(x)) as dW's B operand, a gradient gathered from two outputs) takes one buffer
# more in the compute dtype; the gradient tile of a dual output is read by two loads. The worst code
# variant and the worst card set it (fp32 dz on sm_90 takes one more weight-sized buffer; IEEE fp32
# products on sm_89/sm_120 one more activation-sized one); _SLACK covers barriers and the epilogue's
# small scratch. The compile check reports the estimate beside the compiled size of every config, and
# fails when the estimate lets candidates() offer a config whose compiled size does not fit.
_WEIGHT_BYTES = 4
_SLACK = 1024


def shared_bytes(kernel: str, tile: Tile, elem_bytes: int) -> int:
    """Estimated shared memory (bytes) of a tuned GEMM kernel's tile with operands of elem_bytes bytes: an
    upper bound of what its worst code variant compiles to on any card (see the comment above)."""
    bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
    e, w, depth = elem_bytes, max(elem_bytes, _WEIGHT_BYTES), max(tile.num_stages - 1, 1)
    if kernel == "bn_relu_conv1x1_fwd":
        # loads: x [BM, BK], W [BK, BN], the 4 BN vectors [BK] fp32; operands: W in the compute dtype, and
        # relu(bn(x)) only with fp32 operands (IEEE fp32 products run on FMAs, which read both operands
        # from shared memory on sm_89/sm_120; a tensor-core MMA takes it from registers)
        loads, operands = bm * bk * e + bk * bn * w + 4 * bk * 4, bk * bn * e + (bm * bk * e if e >= 4 else 0)
    elif kernel == "bn_relu_conv1x1_bwd_dz":
        # loads: dy [BM, BN] twice (dual outputs), W [BN, BK]; operands: dy, W in the compute dtype (twice
        # with fp32 operands)
        loads, operands = 2 * bm * bn * e + bn * bk * w, bm * bn * e + bn * bk * e * (2 if e >= 4 else 1)
    elif kernel == "bn_relu_conv1x1_bwd_reduce":
        # loads: dy [BM, BN] twice (dual outputs), x [BM, BK] (W [BN, BK] once, before the loop: not
        # pipelined); operands: relu(bn(x)), W in the compute dtype, dy and dy^T (one buffer each when
        # both products run: dW's and the sums')
        loads, operands = 2 * bm * bn * e + bm * bk * e, bm * bk * e + bn * bk * e + 2 * bm * bn * e
    elif kernel == "bn_relu_conv1x1_bwd_dgrad":
        # as dz's: loads dy [BM, BN] twice (dual outputs), W [BN, BK]; operands dy, W in the compute dtype
        loads, operands = 2 * bm * bn * e + bn * bk * w, bm * bn * e + bn * bk * e * (2 if e >= 4 else 1)
    else:
        raise KeyError(f"no shared-memory estimate for kernel {kernel!r}")
    return depth * loads + operands + _SLACK


def _all(kernel: str, card: Card):
    if kernel not in TUNED_KERNELS:
        raise KeyError(f"no tile configs for kernel {kernel!r}; tuned kernels: {', '.join(TUNED_KERNELS)}")
    group = _GROUP_M_INTERPRETER if card.is_interpreter else _GROUP_M.get(kernel)
    group = group if kernel in _GROUP_M else None
    return [_tile(*cfg, group_m=group) for cfg in FAMILY_CONFIGS[card.family][kernel]]


def candidates(kernel: str, card: Card, elem_bytes: int = 2, sizes: dict | None = None) -> list[Tile]:
    """The configs the tuner times for `kernel` on `card` with operands of elem_bytes bytes: those whose
    shared memory fits the card (the smallest always stays) and, given sizes (M, K, N), those not far
    larger than the problem (a 256-wide tile for 64 channels only wastes tuning time)."""
    tiles_ = _all(kernel, card)
    fits = [t for t in tiles_ if shared_bytes(kernel, t, elem_bytes) <= card.shared_bytes]
    if not fits:
        fits = [min(tiles_, key=lambda t: shared_bytes(kernel, t, elem_bytes))]
    if sizes:
        cap = {dim: max(64, _next_pow2(sizes[dim])) for dim in ("M", "K", "N")}
        small = [t for t in fits if t["BLOCK_M"] <= cap["M"] and t["BLOCK_N"] <= cap["N"] and t["BLOCK_K"] <= cap["K"]]
        fits = small or fits[-1:]
    return fits


def all_configs(kernel: str, card: Card) -> list[Tile]:
    """Every config of `kernel` on `card`, before the shared-memory and size filters (the compile check)."""
    return _all(kernel, card)


_MIN: dict = {}  # (kernel, card, param) -> min over all_configs: one lookup per launch


def min_param(kernel: str, card: Card, param: str) -> int:
    """The smallest `param` (e.g. BLOCK_M) of `kernel`'s configs on `card`: buffers of per-tile partials
    are sized for it, so they fit whichever config the tuner picks."""
    key = (kernel, card, param)
    found = _MIN.get(key)
    if found is None:
        found = _MIN[key] = min(t[param] for t in _all(kernel, card))
    return found


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# Fixed tiles of the kernels that are not tuned
# ---------------------------------------------------------------------------------------------------
def tiles(kernel: str, card: Card) -> dict:
    """The fixed tile of an elementwise or statistics kernel on `card`.

    batch_stats: 64 channels x 2 bytes = one 128-byte line per row on a GPU; the interpreter prefers a
        few large-ish programs. bn_relu: [64 rows x 64 channels] tiles of 8 KiB; the reduction runs
        two waves of programs per channel block (`reduce_programs`). conv1x1_dx: the elementwise dx pass.
    """
    interp = card.is_interpreter
    if kernel == "batch_stats":
        return dict(BLOCK_M=64 if interp else 256, BLOCK_C=32 if interp else 64,
                    BLOCK_P=32 if interp else 64, MERGE_BLOCK_C=32 if interp else 64,
                    num_warps=4 if interp else 8)
    if kernel == "bn_relu":
        return dict(BLOCK_M=1024 if interp else 64, BLOCK_C_MAX=64,
                    reduce_programs=2 if interp else 2 * card.sms, BLOCK_P=2 if interp else 16)
    if kernel == "bn_relu_conv1x1_bwd_dx":
        return dict(BLOCK_M=64, BLOCK_K=32 if interp else 64, num_warps=4)
    raise KeyError(f"no fixed tile for kernel {kernel!r}")
