"""Ahead-of-time compile check of every Triton kernel specialisation; no GPU needed.

``triton.compile`` for sm_80 and sm_90a of every kernel in ``KERNELS`` — cross-entropy (fwd:
the chunked forward, row: the same kernel on the register-resident path (RESIDENT; no class
weights, probability targets or softcap above CROSS_ENTROPY_RESIDENT_MAX_EXTRAS), split: the
split-row forward's cooperative variant, split1 and split2: its two-phase variant's launches, bwd, scale),
dropout and dropout + add + norm (dropout, norm_fwd, norm_bwd), vector_norm
(vnorm_fwd, vnorm_merge, vnorm_bwd; flags next to its table entries), the multi-tensor norms
(fn_*) — for each data
dtype, the flag constexprs the launchers can pass (fwd ``WSPGZCA``: HAS_WEIGHT, HAS_SMOOTHING,
PROB_TARGET, WRITE_GRAD, HAS_Z_LOSS, HAS_SOFTCAP, ARGMAX; bwd ``WSPTC``: ..., TARGET_GRAD, HAS_SOFTCAP; dropout ``BR``: HAS_BIAS, HAS_RESIDUAL;
norm_fwd ``MRWBD``: IS_RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, HAS_DROPOUT; norm_bwd ``MNRWBD``:
IS_RMS, HAS_DH_NEXT, ...; vocab-parallel vp_stats / vp_grad ``WSC``: HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
and each distinct (block, num_warps) that the tuning table picks for the sizes
``V`` (cross-entropy vocabularies ``VOCABS``, hidden sizes ``HIDDEN``), with arguments
specialised as triton's launcher does: 16-byte aligned pointers; the row length and strides (``C``)
  16   divisible by 16 (``tt.divisibility``): aligned rows, e.g. V = 32000, 128256, 262144;
       compiled for every config (V "-": no listed size gets that config with aligned rows);
  any  not divisible, e.g. V = 7, 1000, 50257: such rows cannot be read with vector loads;
  1    C == 1 becomes a constexpr, as triton makes any int argument equal to 1 (V = 1).
Strides are never specialised to 1.

Per cubin, the wheel's ``cuobjdump -res-usage`` gives regs, spill (STACK + LOCAL bytes) and
``+static`` shared memory (``smem``: the dynamic shared memory of the launch); its disassembler
the widest LDG of the SASS in bits (``LDG``). ``rowld`` is the width of the loads of the data
rows themselves (from the LLVM IR, whose debug lines name each load; ptxas makes each one LDG
that wide), ``vec`` their elements. From the TTIR, the integer multiplies fed by the program id
(row index times stride: ``tools/ttir.py``) must be 64-bit, or the offsets wrap past 2^31
elements. ``ld/el`` (cross-entropy kernels) counts the SASS LDGs of the data rows (the LDGs
of their width, less the IR's other loads of that width) times the elements each reads, per
element a thread holds in a chunk: 1.00 is one read of the logits (the register-resident path,
backward), 2.00 the chunked forward with the gradient. For the kernels that draw a dropout mask,
``inst/el`` is the SASS instruction count per
element a thread handles (straight-line code: each thread runs it once per pass) and ``philox/el``
the Philox-4x32-10 calls per element (32 x 32 -> high multiplies / 20: a call per element is 1.0,
the kernels' layout 0.125, plus the odd multiply of an address). Exits 1 on any failed compile,
spill or 32-bit program offset.

Default (~2-3 min on 2 idle cores): every flag combination at the largest block (the config of
the LLM vocabularies / hidden sizes, C = 16 and any); elsewhere the representative flags (none,
each alone, all), but none and all for C = any. Option flags (the cross-entropy's Z, C) are combined
with every other flag only under ``--all``; by default each option combination is compiled with
the other flags all off and all on. ``--all``: every combination everywhere.
``--quick``: bf16, largest block, C = 16, none and all flags (67 compiles per arch).

  python -m tools.aot [--quick | --all] [--arch 80,90] [--kernel fwd,dropout,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedls.backend.triton import tuning
from fusedls.backend.triton.tuning import (
    LaunchConfig, cross_entropy_config, cross_entropy_resident_config, dropout_config, dropout_norm_config,
    foreach_norm_config, foreach_norm_merge_config,
)  # fmt: skip

from .ttir import program_products

VOCABS = (1, 7, 1000, 8000, 16000, 32000, 50257, 128256, 262144)  # cross-entropy rows
HIDDEN = (768, 1000, 2048, 4096, 8192)  # dropout + add + norm rows (1000: not a multiple of 16)
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # triton type -> bytes
ARCHS = {80: "sm_80", 90: "sm_90a"}
_DIV16 = [["tt.divisibility", 16]]  # what BaseBackend.parse_attr makes of a 16-divisible arg


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Triton kernel of the table and how its launches are specialised."""

    module: str  # fusedls.backend.triton.<module>
    function: str
    flags: tuple[str, ...]  # flag constexprs, in the order of their letters
    letters: str
    block: str  # name of the block-size constexpr
    fp32_ptrs: frozenset[str] = frozenset()  # pointers to fp32 data; others point to the data dtype
    i64_ptrs: frozenset[str] = frozenset()  # pointers to int64 data
    row_loads: tuple[str, ...] = ()  # source text of the loads of the data rows ("rowld")
    excludes: tuple[str, str] = ("", "")  # two flags that are never on together
    options: int = 0  # the last `options` flags are options (see _flag_sets)
    constants: tuple = ()  # (name, value) constexprs fixed for this entry
    flag_sets: tuple[str, ...] = ()  # the only flag combinations launched (default: every one)
    derived: object = None  # Row -> further constexprs (e.g. a second block size), or None
    ptr_types: tuple = ()  # (name, triton type) of pointers to other data (int8, int16, int32)
    sizes: frozenset[str] = frozenset()  # int arguments specialised like C (16: divisible by 16)
    launch_options: object = None  # Row -> launch options replacing the LaunchConfig's (e.g. num_stages)
    i32_ptrs: frozenset[str] = frozenset()  # pointers to int32 data


_CE = ("HAS_WEIGHT", "HAS_SMOOTHING", "PROB_TARGET")
_CE_FP32 = frozenset({"weight_ptr", "loss_ptr", "lse_ptr", "coef_ptr", "grad_scale_ptr", "grad_loss_ptr", "factor_ptr"})
_CE_LOADS = ("tl.load(logits_row + cols", "tl.load(grad_row + cols")
_NORM_FP32 = frozenset({"mean_ptr", "rstd_ptr", "dweight_ptr", "dbias_ptr"})
_NORM_LOADS = ("tl.load(x_ptr + offsets", "tl.load(h_ptr + offsets", "tl.load(dy_ptr + offsets")
_SEED = frozenset({"seed_ptr"})
_VP = ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")
_VP_FP32 = frozenset({"weight_ptr", "lse_ptr", "stats_ptr", "coef_ptr", "target_coef_ptr", "scale_ptr"})
KERNELS = {  # short name -> Kernel
    "fwd": Kernel("cross_entropy_kernels", "cross_entropy_fwd_kernel",
                  _CE + ("WRITE_GRAD", "HAS_Z_LOSS", "HAS_SOFTCAP", "ARGMAX"), "WSPGZCA", "BLOCK_C", _CE_FP32,
                  frozenset({"target_ptr", "argmax_ptr"}), _CE_LOADS, options=3, constants=(("RESIDENT", False),)),
    # the forward kernel on the register-resident path (rows the tuning table holds whole)
    "row": Kernel("cross_entropy_kernels", "cross_entropy_fwd_kernel",
                  _CE + ("WRITE_GRAD", "HAS_Z_LOSS", "HAS_SOFTCAP", "ARGMAX"), "WSPGZCA", "BLOCK_C", _CE_FP32,
                  frozenset({"target_ptr", "argmax_ptr"}), _CE_LOADS, options=3, constants=(("RESIDENT", True),)),
    # the split-row forward: split is the cooperative variant (PHASE 0: the handshake), split1 and
    # split2 the two-phase variant's launches (partials; merge and gradient); MAX_SPLITS for V up
    # to 262144
    **{name: Kernel("cross_entropy_split", "cross_entropy_split_kernel",
                    _CE + ("WRITE_GRAD", "HAS_Z_LOSS", "HAS_SOFTCAP", "ARGMAX"), "WSPGZCA", "BLOCK_C",
                    _CE_FP32 | {"partials_ptr"}, frozenset({"target_ptr", "argmax_ptr"}), _CE_LOADS, options=3,
                    constants=(("PHASE", phase), ("MAX_SPLITS", 32)),
                    i32_ptrs=frozenset({"partial_args_ptr", "count_ptr"}))
       for name, phase in (("split", 0), ("split1", 1), ("split2", 2))},
    "bwd": Kernel("cross_entropy_kernels", "cross_entropy_bwd_kernel", _CE + ("TARGET_GRAD", "HAS_SOFTCAP"), "WSPTC",
                  "BLOCK_C", _CE_FP32, frozenset({"target_ptr"}), _CE_LOADS, options=1),
    "scale": Kernel("cross_entropy_kernels", "cross_entropy_scale_grad_kernel", (), "", "BLOCK_C", _CE_FP32, frozenset(),
                    ("tl.load(grad_row + cols",)),
    "dropout": Kernel("dropout", "dropout_kernel", ("HAS_BIAS", "HAS_RESIDUAL"), "BR", "BLOCK_N", frozenset(), _SEED,
                      ("tl.load(x_ptr + offsets",), derived=lambda row: {"BLOCK_R": dropout_config(row.block_c).block_r}),
    "norm_fwd": Kernel("dropout", "dropout_add_norm_fwd_kernel",
                       ("IS_RMS", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "HAS_DROPOUT"), "MRWBD", "BLOCK_N",
                       _NORM_FP32, _SEED, _NORM_LOADS, ("IS_RMS", "HAS_BIAS")),
    "norm_bwd": Kernel("dropout", "dropout_add_norm_bwd_kernel",
                       ("IS_RMS", "HAS_DH_NEXT", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "HAS_DROPOUT"), "MNRWBD",
                       "BLOCK_N", _NORM_FP32, _SEED, _NORM_LOADS, ("IS_RMS", "HAS_BIAS")),
    "vp_stats": Kernel("vocab_parallel_cross_entropy", "vocab_parallel_stats_kernel", _VP, "WSC", "BLOCK_C",
                       _VP_FP32, frozenset({"target_ptr"}), ("tl.load(logits_row + cols",)),
    "vp_grad": Kernel("vocab_parallel_cross_entropy", "vocab_parallel_grad_kernel", _VP, "WSC", "BLOCK_C",
                      _VP_FP32, frozenset({"target_ptr"}), ("tl.load(logits_row + cols",)),
}  # fmt: skip
# foreach_norm: one entry per norm kind (KIND, IS_TWO) or map MODE; the merge kernels read fp32
# partials (their dtype column only types like_ptr, unused there). Flags: merge ``N``:
# WRITE_NORM; total ``SOC``: SQUARE, NORM_OF_NORMS, WRITE_COEF; partial ``A``: ALIGNED; map ``AO``:
# ALIGNED, OUT_ALIGNED (an unaligned group loads one element at a time). BLOCK_C of partial and
# map is the chunk; their CHUNKS (chunks per work item) is tuning's FOREACH_NORM_CHUNKS.
_FN_I64 = frozenset({"table_ptr", "src_table_ptr", "dst_table_ptr", "numel_ptr", "item_tensor_ptr", "item_start_ptr",
                     "first_ptr", "out_index_ptr"})
_FN_FP32 = frozenset({"part_a_ptr", "part_b_ptr", "tensor_a_ptr", "tensor_b_ptr", "norm_ptr", "total_ptr", "coef_ptr"})
_FN_LOADS = ("x = tl.load(src + rel",)


def _fn_chunks(row) -> dict:  # the elementwise kernels' chunks per work item
    return {"CHUNKS": tuning.foreach_norm_config().chunks}


for _kind, (_k, _two) in {"p2": (0, True), "p": (0, False), "l1": (1, False), "max": (2, False), "min": (3, False),
                          "l0": (4, False)}.items():
    _fixed = (("KIND", _k), ("IS_TWO", _two))
    KERNELS[f"fn_partial_{_kind}"] = Kernel("foreach_norm", "foreach_norm_partial_kernel", ("ALIGNED",), "A", "BLOCK",
                                            _FN_FP32, _FN_I64, _FN_LOADS, constants=_fixed, derived=_fn_chunks)
    KERNELS[f"fn_merge_{_kind}"] = Kernel("foreach_norm", "foreach_norm_merge_kernel", ("WRITE_NORM",), "N", "BLOCK",
                                          _FN_FP32, _FN_I64, constants=_fixed)
    KERNELS[f"fn_total_{_kind}"] = Kernel("foreach_norm", "foreach_norm_total_kernel",
                                          ("SQUARE", "NORM_OF_NORMS", "WRITE_COEF"), "SOC", "BLOCK", _FN_FP32, _FN_I64,
                                          constants=_fixed)
for _name, _mode in (("scale", 0), ("sign", 1), ("twice", 2)):
    KERNELS[f"fn_map_{_name}"] = Kernel("foreach_norm", "foreach_map_kernel", ("ALIGNED", "OUT_ALIGNED"), "AO", "BLOCK",
                                        _FN_FP32, _FN_I64, _FN_LOADS, constants=(("MODE", _mode),), derived=_fn_chunks)
_CE_ROW_STRIDES = {"stride_logits", "stride_target", "stride_grad", "stride_grad_target"}
_ROW_SIZES = {"n_cols", "n_elements"}

# vector_norm: fwd ``MNPSZTF``: MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO (the norm's kind, one of
# _VNORM_KINDS: p = 1, 2, p > 0, p < 0, inf, -inf, 0), TIES (for ord +-inf), FINAL; merge ``MNPSZ``;
# bwd ``MPS``. Row sizes ``VECTOR_NORM_SIZES`` (many rows, except the split path's 2^20); BLOCK_R as for many rows.
VECTOR_NORM_SIZES = (7, 1000, 4096, 1 << 20)
_VNORM_KINDS = ("-----", "---S-", "--P--", "-NP--", "M----", "MN---", "----Z")
_VNORM_FLAGS = ("MAXIMUM", "NEGATIVE", "POWER", "SQUARE", "NONZERO")
_VNORM_FP32 = frozenset({"norm_ptr", "count_ptr", "part_r_ptr", "part_s_ptr"})


def _vnorm_block_r(row) -> dict:
    return {"BLOCK_R": tuning.vector_norm_config(1 << 30, row.block_c, DTYPES[row.dtype]).block_r}


KERNELS.update({
    "vnorm_fwd": Kernel("vector_norm", "vector_norm_fwd_kernel", _VNORM_FLAGS + ("TIES", "FINAL"), "MNPSZTF",
                        "BLOCK_N", _VNORM_FP32, frozenset(), ("tl.load(x_rows + cols",),
                        flag_sets=tuple(k + t + f for k in _VNORM_KINDS for t in ("-T" if k[0] == "M" else "-")
                                        for f in "-F"), derived=_vnorm_block_r),
    "vnorm_merge": Kernel("vector_norm", "vector_norm_merge_kernel", _VNORM_FLAGS, "MNPSZ", "BLOCK_S", _VNORM_FP32,
                          frozenset(), ("tl.load(part_r_ptr + at",), flag_sets=_VNORM_KINDS),
    "vnorm_bwd": Kernel("vector_norm", "vector_norm_bwd_kernel", ("MAXIMUM", "POWER", "SQUARE"), "MPS", "BLOCK_N",
                        _VNORM_FP32, frozenset(), ("tl.load(x_ptr + rows[:, None] * stride_row",),
                        flag_sets=("---", "--S", "-P-", "M--"), derived=_vnorm_block_r),
})  # fmt: skip
_CE_ROW_STRIDES |= {"stride_row"}  # vector_norm's rows: aligned exactly when N is


def _vector_norm_variants(kernel: str, dtype: str) -> dict[tuple, list[str]]:
    """(BLOCK_N or BLOCK_S, num_warps, C spec) -> the row sizes launched with it."""
    if kernel == "vnorm_merge":
        return {(tuning.VECTOR_NORM_MERGE_BLOCK, tuning.VECTOR_NORM_MERGE_WARPS, "16"): ["-"]}
    variants: dict[tuple, list[str]] = {}
    for n in VECTOR_NORM_SIZES:
        cfg = tuning.vector_norm_config(1 if n >= 1 << 20 else 16384, n, DTYPES[dtype])
        variants.setdefault((cfg.block_n, cfg.num_warps, "16" if n % 16 == 0 else "any"), []).append(str(n))
    return variants


@dataclasses.dataclass
class Row:
    arch: int
    kernel: str
    dtype: str
    flags: str  # e.g. "WS-G": the letters of the flags that are on
    cspec: str  # "16", "any" or "1": how C and the row strides are specialised
    vocab: str  # the V of VOCABS launched with exactly this specialisation, or "-"
    block_c: int
    num_warps: int
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0  # dynamic shared memory (triton's metadata)
    shared_static: int = 0  # cuobjdump SHARED
    row_ld: int = 0  # bits per load of the logits row
    ldg: int = 0  # widest LDG in the SASS, bits
    sass_ops: int = 0  # SASS instructions of the kernel (straight-line kernels: what each thread runs)
    row_ldgs: int = 0  # SASS LDGs of the data rows (LDGs of their width less the other loads that wide)
    mulhi: int = 0  # 32 x 32 -> high multiplies (IMAD.HI / IMAD.WIDE.U32): Philox takes 20 per call
    offsets64: int = 0  # integer multiplies fed by the program id, done in 64 bits (TTIR)
    offsets32: str = ""  # those done in fewer bits (TTIR lines): offsets that wrap past 2^31
    error: str = ""

    @property
    def spill(self) -> int:
        return self.stack + self.local


def _flag_sets(kernel: str, every: bool, all_options: bool = False) -> list[str]:
    k = KERNELS[kernel]
    if k.flag_sets:
        return list(k.flag_sets)
    n_base = len(k.flags) - k.options
    combos = itertools.product((0, 1), repeat=n_base)
    if kernel == "bwd":
        combos = [c for c in combos if c[2] or not c[3]]  # TARGET_GRAD needs PROB_TARGET
    if k.excludes[0]:
        i, j = (k.flags.index(f) for f in k.excludes)
        combos = [c for c in combos if not (c[i] and c[j])]
    combos = list(combos)
    if not every:
        combos = [c for c in combos if sum(c) in (0, 1, len(c)) or c == combos[-1] or c == (0, 0, 1, 1)]
    # Options: with every other combination under --all, else with the others all off / all on
    # (the last entry stays the one with every flag on).
    options = list(itertools.product((0, 1), repeat=k.options))
    combos = [c + options[0] for c in combos] + [
        c + o for o in options[1:] for c in (combos if all_options else [combos[0], combos[-1]])
    ]
    return ["".join(ch if on else "-" for ch, on in zip(k.letters, c)) for c in combos]


def dropout_norm_max_n(element_size: int) -> int:
    """Longest row the dropout + add + norm kernels take (longer ones run eagerly)."""
    return tuning.DROPOUT_NORM_MAX_N[element_size]


def _variants(kernel: str, dtype: str) -> dict[tuple, list[str]]:
    """(block, num_warps, C spec) -> the sizes launched with it (see the module docstring)."""
    variants: dict[tuple, list[str]] = {}
    module = KERNELS[kernel].module
    if module == "foreach_norm":  # sizes do not specialise these kernels (no row length argument)
        elementwise = KERNELS[kernel].function in ("foreach_norm_partial_kernel", "foreach_map_kernel")
        cfg = foreach_norm_config() if elementwise else foreach_norm_merge_config()
        return {(cfg.block_c, cfg.num_warps, "16"): []}
    if module == "vector_norm":
        return _vector_norm_variants(kernel, dtype)
    if module.startswith("linear_cross_entropy"):
        return _fused_variants(kernel, dtype)
    sizes = HIDDEN if module == "dropout" else VOCABS  # cross-entropy and vocab-parallel rows
    for v in sizes:
        if kernel == "dropout":
            cfg = dropout_config(v)
        elif module == "dropout":
            if v > dropout_norm_max_n(DTYPES[dtype]):
                continue
            cfg = dropout_norm_config(v)
        elif kernel.startswith("split"):  # rows longer than a slice (the launcher's other conditions need a device)
            block = tuning.CROSS_ENTROPY_SPLIT_BLOCK[DTYPES[dtype]]
            if v <= block:
                continue
            cfg = LaunchConfig(block, tuning.CROSS_ENTROPY_SPLIT_WARPS)
        else:
            resident = cross_entropy_resident_config(v, DTYPES[dtype]) if kernel in ("fwd", "row") else None
            if (kernel == "row") != (resident is not None):  # the forward takes one path per size
                continue
            cfg = resident or cross_entropy_config(v, DTYPES[dtype])
        variants.setdefault((cfg.block_c, cfg.num_warps, "16"), [])
        spec = "1" if v == 1 else "16" if v % 16 == 0 else "any"
        variants.setdefault((cfg.block_c, cfg.num_warps, spec), []).append(str(v))
    return variants


def plan(archs=(80, 90), quick=False, kernels=None, every=False) -> list[Row]:
    """The rows to compile (see the module docstring)."""
    rows = []
    for arch, kernel, dtype in itertools.product(archs, kernels or KERNELS, DTYPES):
        if quick and dtype != "bf16":
            continue
        variants = _variants(kernel, dtype)
        largest = max(block for block, _, _ in variants)
        for block, warps, spec in sorted(variants, key=lambda k: (k[0], "16 1 any".index(k[2]))):
            if quick and (block, spec) != (largest, "16"):
                continue
            flags = _flag_sets(kernel, every or (block == largest and spec != "1"), every)
            if quick or (spec == "any" and block != largest and not every):
                flags = sorted({flags[0], flags[-1]})
            if kernel == "row" and block > tuning.CROSS_ENTROPY_RESIDENT_MAX_EXTRAS:  # those go chunked
                flags = list(dict.fromkeys(re.sub("[WPC]", "-", f) for f in flags))
            vs = ",".join(variants[block, warps, spec]) or "-"
            rows += [Row(arch, kernel, dtype, f, spec, vs, block, warps) for f in flags]
    return rows


def _interpreted() -> bool:  # triton imported under TRITON_INTERPRET=1 (as the CPU tests do):
    from triton.language import standard  # its @jit tl.max, tl.sum... cannot compile in here

    return not isinstance(standard.max, triton.runtime.JITFunction)


def _path(module: str) -> str:
    return importlib.util.find_spec(f"fusedls.backend.triton.{module}").origin


@functools.lru_cache(maxsize=None)
def _row_load_lines(kernel: str) -> frozenset[int]:
    with open(_path(KERNELS[kernel].module)) as f:
        return frozenset(i for i, text in enumerate(f, 1) if any(p in text for p in KERNELS[kernel].row_loads))


def _source(row: Row) -> ASTSource:
    k = KERNELS[row.kernel]
    fn = getattr(importlib.import_module(f"fusedls.backend.triton.{k.module}"), k.function)
    constexprs = dict(zip(k.flags, (ch != "-" for ch in row.flags)))
    constexprs[k.block] = row.block_c
    constexprs.update(k.constants)
    if k.derived:
        constexprs.update(k.derived(row))
    if row.cspec == "1":
        constexprs["n_cols"] = 1
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            prob = name == "target_ptr" and constexprs.get("PROB_TARGET")
            kind = "fp32" if name in k.fp32_ptrs else "i64" if name in k.i64_ptrs and not prob else row.dtype
            kind = "i32" if name in k.i32_ptrs else kind
            signature[name], aligned = "*" + dict(k.ptr_types).get(name, kind), 1
        elif name in ("keep", "spread", "p", "scale", "eps", "z_loss", "softcap", "max_norm"):
            signature[name], aligned = "fp32", 0
        elif name in _ROW_SIZES or name in _CE_ROW_STRIDES or name in k.sizes:
            signature[name], aligned = "i32", row.cspec != "any"
        elif name == "n_groups":  # ceil(N / 8): divisible by 16 when N is by 128 (every aligned size here)
            signature[name], aligned = "i32", row.cspec == "16"
        else:  # broadcast strides (0; 1 is not specialised here), n_rows, ignore_index, d (fused)
            signature[name], aligned = "i32", name.startswith("stride") or (name == "d" and bool(k.sizes))
        if aligned:
            attrs[(i,)] = _DIV16
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


@functools.lru_cache(maxsize=None)
def _tool(name: str) -> str | None:  # the triton wheel's cuobjdump / nvdisasm, else PATH's
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else shutil.which(name)


def _bits(op: str) -> int:  # width of an LDG (SASS) or ld.global (PTX) opcode
    parts = op.split(".")
    wide = [int(p) for p in parts if p in ("64", "128", "256")]
    vec = [int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)] or [1]
    size = [int(p[1:]) for p in parts if re.fullmatch(r"[bsuf]\d+|[SU](8|16)", p)] or [32]
    return wide[0] if wide else vec[0] * size[0]


def _inspect(row: Row, cubin: bytes, llir: str) -> None:
    if not _tool("cuobjdump"):
        raise RuntimeError("cuobjdump is neither in the triton wheel nor on PATH")
    # nvdisasm -ndf prints the SASS that `cuobjdump -sass` prints, in 2/3 of the time
    dis = [_tool("nvdisasm"), "-ndf", "-c"] if _tool("nvdisasm") else [_tool("cuobjdump"), "-sass"]
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res, sass = (run(c + [f.name]).stdout for c in ([_tool("cuobjdump"), "-res-usage"], dis))
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    row.regs, row.stack = usage.get("REG", 0), usage.get("STACK", 0)
    row.local, row.shared_static = usage.get("LOCAL", 0), usage.get("SHARED", 0)
    row.ldg = max((_bits(m) for m in re.findall(r"\bLDG(?:\.[\w.]+)?(?!\w)", sass)), default=0)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    row.sass_ops = len([op for op in ops if not op.startswith("NOP")])
    row.mulhi = len([op for op in ops if op.startswith(("IMAD.HI.U32", "IMAD.WIDE.U32"))])
    # The SASS line info cannot tell the row loads apart (ptxas tags some with neighbouring
    # lines); the debug location of each ld.global in the LLVM IR is exact.
    lines = dict(re.findall(r"^!(\d+) = !DILocation\(line: (\d+)", llir, re.M))
    loads = re.findall(r"(ld\.global[\w.:]*)\s[^\n]*!dbg !(\d+)", llir)
    row_lines = {str(n) for n in _row_load_lines(row.kernel)}
    row.row_ld = max((_bits(op) for op, d in loads if lines.get(d) in row_lines), default=0)
    # ptxas makes each ld.global one LDG: the row loads are the SASS LDGs of their width but
    # the IR's other loads of that width.
    others = len([op for op, d in loads if lines.get(d) not in row_lines and _bits(op) == row.row_ld])
    widths = [_bits(op) for op in ops if re.fullmatch(r"LDG(\.[\w.]+)?", op)]
    row.row_ldgs = widths.count(row.row_ld) - others if row.row_ld else 0


def _error(exc: Exception, module: str) -> str:
    while type(exc.__cause__).__name__ == "CompilationError":  # raised in a called @jit function
        exc = exc.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
    at = re.match(r"at (\d+):\d+:", lines[0])  # CompilationError: "at L:C:", source lines, "^"
    caret = next((i for i, line in enumerate(lines) if line.strip() == "^"), 0)
    if not (at and caret):
        return f"{type(exc).__name__}: {lines[-1]}"
    path = _path(module)
    with open(path) as f:
        text = f.read()
    start = text.find(getattr(exc, "src", None) or "\0")  # L counts from the function's def
    line = text.count("\n", 0, start) + int(at[1])
    where = f"{os.path.basename(path)}:{line}" if start >= 0 else lines[0]
    return f"{where}: `{lines[caret - 1].strip()}`: {lines[-1] if caret < len(lines) - 1 else ''}"


def compile_row(row: Row) -> Row:
    """Compiles one specialisation and fills in its resources (or ``error``)."""
    try:
        k = KERNELS[row.kernel]
        options = k.launch_options(row) if k.launch_options else LaunchConfig(row.block_c, row.num_warps).launch_options()
        target = GPUTarget("cuda", row.arch, 32)
        compiled = triton.compile(_source(row), target=target, options=options)
        row.shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        wide, narrow = program_products(compiled.asm["ttir"])
        row.offsets64, row.offsets32 = len(wide), "; ".join(narrow)
        _inspect(row, compiled.asm["cubin"], compiled.asm.get("llir", ""))
    except Exception as exc:  # a kernel that does not compile is a finding, not a crash
        row.error = _error(exc, KERNELS[row.kernel].module)
    return row


def compile_table(archs=(80, 90), quick=False, kernels=None, every=False, jobs=0) -> list[Row]:
    """Compiles the planned specialisations in ``jobs`` processes (default: one per core)."""
    rows = plan(archs, quick, kernels, every)
    jobs = jobs or min(os.cpu_count() or 1, 8)
    fresh = _interpreted() or "fork" not in multiprocessing.get_all_start_methods()
    if jobs <= 1 and not fresh:
        return [compile_row(r) for r in rows]
    if not fresh:  # import the kernels once, before forking
        for name, k in KERNELS.items():
            importlib.import_module(f"fusedls.backend.triton.{k.module}")
            _row_load_lines(name)
    ctx = multiprocessing.get_context("spawn" if fresh else "fork")
    saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            return list(pool.map(compile_row, rows, chunksize=4))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


HEADER = ("arch", "kernel", "dtype", "flags", "C", "V", "BLOCK_C", "warps",
          "regs", "spill", "smem", "+static", "rowld", "vec", "LDG", "ld/el", "inst/el", "philox/el")  # fmt: skip
PHILOX_MULHI = 20  # high multiplies per Philox-4x32-10 call (2 a round)


def elements_per_thread(r: Row) -> float | None:
    """Elements a thread handles per pass of the dropout kernels (None for the other kernels):
    the per-element SASS and Philox counts of the table divide by it."""
    if KERNELS[r.kernel].module != "dropout":
        return None
    rows = dropout_config(r.block_c).block_r if r.kernel == "dropout" else 1
    return rows * r.block_c / (32 * r.num_warps)


def row_loads_per_element(r: Row) -> float | None:
    """SASS loads of the data rows per element of a row (cross-entropy kernels): each element a
    thread holds in a chunk, over the loads that read it. 1 is one read of the logits (the
    register-resident forward, backward); 2 the forward with the gradient that sweeps its rows
    twice. None where the data rows are not found."""
    if not KERNELS[r.kernel].module.startswith("cross_entropy") or not r.row_ld or r.row_ldgs <= 0:
        return None
    per_thread = max(1.0, r.block_c / (32 * r.num_warps))
    return r.row_ldgs * (r.row_ld // (8 * DTYPES[r.dtype])) / per_thread


def format_table(rows: list[Row]) -> str:
    cells = [HEADER]
    for r in rows:
        vec = f"x{r.row_ld // (8 * DTYPES[r.dtype])}" if r.row_ld else "-"
        per = elements_per_thread(r)
        inst = f"{r.sass_ops / per:.1f}" if per else "-"
        draws = per and (r.kernel == "dropout" or "D" in r.flags)  # the kernels that draw a mask
        philox = f"{r.mulhi / PHILOX_MULHI / per:.3f}" if draws else "-"
        ld = row_loads_per_element(r)
        res = (r.regs, r.spill, r.shared, r.shared_static, r.row_ld, vec, r.ldg, f"{ld:.2f}" if ld else "-", inst,
               philox)  # fmt: skip
        res = ("FAILED",) + ("",) * 9 if r.error else res
        cells.append((_arch(r.arch), r.kernel, r.dtype, r.flags or "-", r.cspec, r.vocab,
                      r.block_c, r.num_warps, *res))  # fmt: skip
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(HEADER))]
    fmt = lambda j, c: str(c).rjust(widths[j]) if j > 5 else str(c).ljust(widths[j])  # noqa: E731
    return "\n".join("  ".join(fmt(j, c) for j, c in enumerate(line)).rstrip() for line in cells)


def _arch(arch: int) -> str:
    return ARCHS.get(arch, f"sm_{arch}")


def _describe(r: Row) -> str:
    return f"{_arch(r.arch)} {r.kernel} {r.dtype} {r.flags or '-'} C={r.cspec} BLOCK_C={r.block_c}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a small subset (67 compiles per arch)")
    p.add_argument("--all", action="store_true", help="every flag combination for every config")
    p.add_argument("--arch", default="80,90", help="compute capabilities (90 is sm_90a)")
    p.add_argument("--kernel", default="", help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per core)")
    args = p.parse_args(argv)
    kernels = [k.strip() for k in args.kernel.split(",") if k.strip()] or None
    if set(kernels or ()) - set(KERNELS):
        p.error(f"unknown kernel in {kernels}; choose from {list(KERNELS)}")
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as tests/conftest.py sets it
    start = time.perf_counter()
    rows = compile_table(archs, args.quick, kernels, args.all, args.jobs)
    print(format_table(rows))
    failed = [r for r in rows if r.error]
    spilled = [r for r in rows if not r.error and r.spill]
    narrow = [r for r in rows if r.offsets32]
    top = max((r for r in rows if not r.error), key=lambda r: r.regs, default=None)
    most = f", at most {top.regs} registers ({_describe(top)})" if top else ""
    print(f"\n{len(rows)} specialisations for {', '.join(map(_arch, archs))} compiled in "
          f"{time.perf_counter() - start:.1f} s: {len(failed)} failed, {len(spilled)} spilled, "
          f"{len(narrow)} with 32-bit program offsets{most}")  # fmt: skip
    for r in failed + spilled:
        print(f"  {_describe(r)}: {r.error or f'spills {r.local} B local, {r.stack} B stack'}")
    for r in narrow:
        print(f"  {_describe(r)}: 32-bit offsets from the program id: {r.offsets32}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), spill=r.spill) for r in rows], f, indent=1)
    return 1 if failed or spilled or narrow else 0



# linear_cross_entropy(strategy="fused"): GEMM tiles of tuning.fused_config() (BLOCK_V is the
# "block"; BLOCK_N, BLOCK_K, BLOCK_D, GROUP, num_stages and the tl.dot precision follow the table
# and the dtype). C = 16: the vocabulary V and the gradient block's width divisible by 16, e.g.
# Llama-3's 4096 x 128256; any: e.g. GPT-2's 768 x 50257 (the last block ragged; its buffer's
# rows stay 16-aligned). The hidden size d is divisible by 16 in both (every LM head's is);
# another d runs (tests: d = 8, 24) with masked, unvectorised loads outside this table.
# Flags: stats ``BWSCM``: HAS_BIAS, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, TILE_MAX (never with
# the cap: the filter refuses it); grad ``BWSCF``: ..., FILTER (same); target ``B``: HAS_BIAS;
# dw ``WB``: HAS_WEIGHT, HAS_BIAS. Launched: none, each alone, all (a GEMM kernel compiles in
# seconds).
_LCE_FP32 = frozenset({"class_weight_ptr", "part_ptr", "lse_ptr", "coef_ptr", "target_coef_ptr", "scale_ptr",
                       "grad_b_ptr", "row_sum_ptr", "grad_h_ptr"})  # fmt: skip
_LCE_PTRS = (("tile_max_ptr", "i16"), ("kept_ptr", "i8"), ("order_ptr", "i32"), ("count_ptr", "i32"))
_LCE_SIZES = frozenset({"width"})
_LCE_LOADS = ("a = tl.load(h_rows + ks", "b = tl.load(w_rows + ks", "g = tl.load(g_ptr", "h = tl.load(hidden_ptr",
              "w = tl.load(weight_ptr")  # fmt: skip


def _fused_variants(kernel: str, dtype: str) -> dict[tuple, list[str]]:
    cfg = tuning.fused_config(DTYPES[dtype])
    warps = _fused_warps(kernel, cfg)
    return {(cfg.block_v, warps, "16"): ["4096x128256"], (cfg.block_v, warps, "any"): ["768x50257"]}


def _fused_warps(kernel: str, cfg) -> int:
    return {"lce_dw": cfg.product_warps, "lce_dh": cfg.product_warps, "lce_grad": cfg.grad_warps}.get(kernel, cfg.num_warps)


def _fused_constexprs(names: tuple[str, ...], row) -> dict:
    cfg = tuning.fused_config(DTYPES[row.dtype])
    capped = row.kernel == "lce_grad" and "C" in row.flags
    every = dict(BLOCK_N=cfg.grad_block_n(capped), BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, GROUP=cfg.group,
                 PRECISION="ieee" if row.dtype == "fp32" else "tf32")  # fmt: skip
    return {name: every[name] for name in names}


def _fused_options(row) -> dict:
    cfg = tuning.fused_config(DTYPES[row.dtype])
    if row.kernel == "lce_target":
        return {"num_warps": cfg.num_warps}
    return dict(num_warps=_fused_warps(row.kernel, cfg), num_stages=cfg.num_stages)


def _fused_kernel(module: str, function: str, flags: tuple[str, ...], letters: str, flag_sets: tuple[str, ...],
                  block: str = "BLOCK_V"):
    if module != "linear_cross_entropy":  # the filtered products
        names = ("BLOCK_N", "BLOCK_D", "PRECISION")
    elif "target" in function:  # the row-wise dot
        names = ("BLOCK_K",)
    else:  # the logits GEMMs
        names = ("BLOCK_N", "BLOCK_K", "PRECISION") + (("GROUP",) if "grad" in function else ())
    return Kernel(module, function, flags, letters, block, _LCE_FP32, frozenset({"target_ptr"}), _LCE_LOADS,
                  flag_sets=flag_sets, derived=functools.partial(_fused_constexprs, names), ptr_types=_LCE_PTRS,
                  sizes=_LCE_SIZES, launch_options=_fused_options)  # fmt: skip


_LCE_FLAGS = ("HAS_BIAS", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")
KERNELS.update({
    "lce_stats": _fused_kernel("linear_cross_entropy", "linear_cross_entropy_stats_kernel", _LCE_FLAGS + ("TILE_MAX",),
                               "BWSCM", ("-----", "B----", "-W---", "--S--", "---C-", "----M", "BWSC-", "BWS-M")),
    "lce_grad": _fused_kernel("linear_cross_entropy", "linear_cross_entropy_grad_kernel", _LCE_FLAGS + ("FILTER",),
                              "BWSCF", ("-----", "B----", "-W---", "--S--", "---C-", "----F", "BWSC-", "BWS-F")),
    "lce_target": _fused_kernel("linear_cross_entropy", "linear_cross_entropy_target_kernel", ("HAS_BIAS",), "B",
                                ("-", "B"), block="BLOCK_N"),
    "lce_dw": _fused_kernel("linear_cross_entropy_products", "linear_cross_entropy_dw_kernel", ("HAS_WEIGHT", "HAS_BIAS"),
                            "WB", ("--", "W-", "-B", "WB")),
    "lce_dh": _fused_kernel("linear_cross_entropy_products", "linear_cross_entropy_dh_kernel", (), "", ("",)),
})  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
