"""Launch parameters of the Triton kernels, kept apart from the kernels themselves.

Every row of the logits is swept in chunks of ``block_c`` classes. The chunk is capped so the
per-thread working set stays in registers (``python -m tools.aot`` checks that no
specialisation spills): at the cap one thread holds ``block_c / (32 * num_warps)`` elements.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_c: int  # classes (columns) per chunk (a power of two)
    num_warps: int
    block_r: int = 1  # rows per tile (the 2-D elementwise kernels)

    @property
    def maxnreg(self) -> int:
        """Register cap: all a program may use with one program per SM. Without it ptxas
        aims at two programs per SM and spills a few bytes at 64 registers (seen with
        num_warps 8 and 16 on sm_90a, triton 3.6 and 3.9)."""
        return min(255, 65536 // (32 * self.num_warps))

    def launch_options(self) -> dict:
        """Keyword arguments of a kernel launch (and of triton.compile in tools.aot)."""
        return dict(num_warps=self.num_warps, maxnreg=self.maxnreg)


# Largest chunk per element size in bytes. Tests lower it to make the chunk loop run many
# times on small vocabularies under the interpreter.
CROSS_ENTROPY_MAX_BLOCK = {2: 8192, 4: 4096}

# (largest chunk, warps) in increasing chunk order: the first row whose chunk fits is used.
_CROSS_ENTROPY_WARPS = ((1024, 4), (4096, 8), (8192, 16))


def cross_entropy_config(n_cols: int, element_size: int) -> LaunchConfig:
    """Chunk and warps for a row of ``n_cols`` classes of ``element_size``-byte logits."""
    cap = CROSS_ENTROPY_MAX_BLOCK.get(element_size, CROSS_ENTROPY_MAX_BLOCK[4])
    block = max(16, min(triton.next_power_of_2(max(n_cols, 1)), cap))
    warps = next(w for limit, w in _CROSS_ENTROPY_WARPS if block <= limit or limit == _CROSS_ENTROPY_WARPS[-1][0])
    return LaunchConfig(block_c=block, num_warps=warps)


# Register-resident rows: the forward kernel (RESIDENT) loads a row of at most this many classes
# (per element size in bytes) as one chunk, keeps it in registers and writes the gradient from
# them: one read of the logits, no second sweep. 16384 classes on 16 warps are 32 logits a thread
# within the 128 registers a thread gets at one 512-thread program per SM. `python -m tools.aot
# --kernel row` (sm_80, sm_90a, triton 3.9): no spills there; at 32768 every flag combination
# spills, on 16 warps (64 logits a thread) and on 32 (64 registers). 0 turns the path off.
CROSS_ENTROPY_RESIDENT_MAX = {2: 16384, 4: 16384}
# With class weights, probability targets (a second per-class input, loaded in both phases) or
# softcap (tanh and its derivative per logit) at most this many: each spills at 16384 in some
# combination with the gradient (sm_90a: softcap with smoothing and z-loss; fp32 with weights).
CROSS_ENTROPY_RESIDENT_MAX_EXTRAS = 8192
# (largest row block, warps) of the resident path: at most 16, 32, 32 logits a thread.
_CROSS_ENTROPY_RESIDENT_WARPS = ((2048, 4), (8192, 8), (16384, 16))


def cross_entropy_resident_config(n_cols: int, element_size: int, extras: bool = False) -> LaunchConfig | None:
    """The whole-row block and warps of the register-resident forward for ``n_cols`` classes of
    ``element_size``-byte logits (``extras``: with class weights, probability targets or softcap),
    or None when the row is longer than the table allows."""
    limit = CROSS_ENTROPY_RESIDENT_MAX.get(element_size, CROSS_ENTROPY_RESIDENT_MAX[4])
    if n_cols > (min(limit, CROSS_ENTROPY_RESIDENT_MAX_EXTRAS) if extras else limit):
        return None
    block = max(16, triton.next_power_of_2(max(n_cols, 1)))
    most_warps = _CROSS_ENTROPY_RESIDENT_WARPS[-1][1]
    warps = next((w for limit, w in _CROSS_ENTROPY_RESIDENT_WARPS if block <= limit), most_warps)
    return LaunchConfig(block_c=block, num_warps=warps)


# The forward kernel that also writes the gradient sweeps each row twice; the second sweep
# must find the row in L2. Its programs loop over rows, and their number is capped so that the
# rows in flight (one per program) take at most this fraction of L2: an H100 (50 MB L2, 132
# SMs) keeps 132 rows of 128k bf16 logits (34 MB) in flight, one per SM.
L2_FRACTION = 0.7
MAX_PROGRAMS_PER_SM = 8
# Programs off CUDA (the interpreter): None is one per row; tests set a small number so each
# program loops over several rows.
INTERPRETER_PROGRAMS: int | None = None


@functools.lru_cache(maxsize=None)
def _sm_count_and_l2_bytes(device_index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)


def cross_entropy_programs(device: torch.device, row_bytes: int, n_rows: int) -> int:
    """Programs for the forward kernel with the gradient: rows in flight that fit in L2, at
    least one per SM, at most n_rows; ``row_bytes`` 0 (rows read once, from registers) asks for
    MAX_PROGRAMS_PER_SM per SM. Off CUDA (the interpreter) see INTERPRETER_PROGRAMS."""
    if device.type != "cuda":
        return min(n_rows, INTERPRETER_PROGRAMS or n_rows)
    sms, l2_bytes = _sm_count_and_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    per_sm = int(L2_FRACTION * l2_bytes) // (sms * max(row_bytes, 1))
    return max(1, min(n_rows, sms * max(1, min(per_sm, MAX_PROGRAMS_PER_SM))))


# Split-row path (cross_entropy_split.py): a row cut into slices of CROSS_ENTROPY_SPLIT_BLOCK
# classes, one program per slice holding it in registers (32 logits a thread on
# CROSS_ENTROPY_SPLIT_WARPS warps, as the resident path at 8192), the slices of a row exchanging
# partial statistics (docs/cross_entropy.md has the model). 0 turns the path off for that size.
CROSS_ENTROPY_SPLIT_BLOCK = {2: 8192, 4: 8192}
CROSS_ENTROPY_SPLIT_WARPS = 8
# Rows at least this long take it: the chunked forward's second sweep stops finding its row in
# L2 around 128k bf16 classes (41 % of copy at 4096 x 128256 on an H100).
CROSS_ENTROPY_SPLIT_MIN_COLS = {2: 65536, 4: 32768}
# Fewer rows than this many per SM take it at any length above the resident limit, so a few long
# rows still occupy every SM (8 x 256000 bf16: 8 programs chunked, 256 slices split).
CROSS_ENTROPY_SPLIT_FEW_ROWS_PER_SM = 1
# True: the cooperative variant (one read; programs wait on each other) on GPUs; False: the
# two-phase variant there too (two reads, no waiting). False until a GPU run has passed the tests
# of both and timed them (docs/cross_entropy.md, "Waiting without deadlock").
CROSS_ENTROPY_SPLIT_COOPERATIVE = False
# SM count assumed off CUDA (the interpreter); tests lower the tables above instead.
CROSS_ENTROPY_INTERPRETER_SMS = 2


def cross_entropy_split_config(device: torch.device, n_rows: int, n_cols: int, element_size: int
                               ) -> tuple[LaunchConfig, int] | None:  # fmt: skip
    """(slice block and warps, slices per row) of the split-row forward, or None where the
    table keeps the row whole (long enough rows, or few rows; at least two slices)."""
    block = CROSS_ENTROPY_SPLIT_BLOCK.get(element_size, CROSS_ENTROPY_SPLIT_BLOCK[4])
    if block <= 0 or n_cols <= block:
        return None
    sms = CROSS_ENTROPY_INTERPRETER_SMS if device.type != "cuda" else _sm_count_and_l2_bytes(
        device.index if device.index is not None else torch.cuda.current_device())[0]  # fmt: skip
    long_rows = n_cols >= CROSS_ENTROPY_SPLIT_MIN_COLS.get(element_size, CROSS_ENTROPY_SPLIT_MIN_COLS[4])
    if not long_rows and n_rows >= sms * CROSS_ENTROPY_SPLIT_FEW_ROWS_PER_SM:
        return None
    return LaunchConfig(block_c=block, num_warps=CROSS_ENTROPY_SPLIT_WARPS), triton.cdiv(n_cols, block)


def cross_entropy_split_programs(resident: int, n_splits: int, n_items: int) -> int | None:
    """Programs of the cooperative split-row launch: a multiple of the slices per row (the
    slices of a row run in the same round), at most ``resident`` (what the device holds at once,
    so every program a row waits on is running) and the work items; None if not even one row's
    slices fit at once (the launcher then takes the two-phase variant)."""
    rows_at_once = min(resident, n_items) // n_splits
    return rows_at_once * n_splits if rows_at_once else None


# ----------------------------------------------------------------------------------------------
# vocab_parallel_cross_entropy (fusedls/backend/triton/vocab_parallel_cross_entropy.py)
# ----------------------------------------------------------------------------------------------


# Rows per launch: a chunk of rows holds about this many logits. The kernels need no
# temporaries, but the linear variant materialises each chunk's logits (and, in backward, an
# fp32 gradient chunk): 16M elements are 32 MiB of bf16 logits, and ~1k rows of a 16k-class slice
# (8 programs per SM on an H100). Tests lower it to run the chunk loop.
VOCAB_PARALLEL_CHUNK_ELEMENTS = 1 << 24


def vocab_parallel_config(n_cols: int, element_size: int) -> LaunchConfig:
    """Chunk and warps of the vocabulary-parallel kernels: they sweep a row of a rank's classes
    as the cross-entropy kernels do, with the same per-thread working set, so the same table."""
    return cross_entropy_config(n_cols, element_size)


# ----------------------------------------------------------------------------------------------
# dropout (fusedls/backend/triton/dropout.py)
# ----------------------------------------------------------------------------------------------

# Elementwise dropout / dropout_add: 2-D tiles of at most DROPOUT_TILE elements and DROPOUT_BLOCK_N
# columns (a whole row when it is shorter, several rows per tile), DROPOUT_WARPS warps: 16 elements
# a thread, two Philox calls of 8 draws each.
DROPOUT_TILE = 4096
DROPOUT_BLOCK_N = 2048
DROPOUT_WARPS = 8


def dropout_config(n_cols: int) -> LaunchConfig:
    """Tile (``block_r`` rows of ``block_c`` columns, a power of two >= 16) and warps of
    ``dropout_kernel`` for rows of ``n_cols`` elements."""
    block_n = max(16, min(triton.next_power_of_2(max(n_cols, 1)), DROPOUT_BLOCK_N))
    return LaunchConfig(block_c=block_n, num_warps=DROPOUT_WARPS, block_r=max(1, DROPOUT_TILE // block_n))


# dropout + add + norm keep a whole row in registers; longer rows run on the eager backend. Per
# element size in bytes: fp32 LayerNorm backward (dweight and dbias partial sums in registers
# besides the row) spills a few bytes at 8192 (16 warps, 128 registers; sm_80 and sm_90a).
DROPOUT_NORM_MAX_N = {2: 8192, 4: 4096}
# (largest row block, warps): the first whose block fits is used (at most 32 elements/thread).
_DROPOUT_NORM_WARPS = ((256, 1), (512, 2), (1024, 4), (2048, 8), (8192, 16))
# Programs of the backward kernel (each loops over rows and keeps fp32 partial sums of dweight
# and dbias): this many per SM; off CUDA (the interpreter) DROPOUT_NORM_INTERPRETER_PROGRAMS.
DROPOUT_NORM_PROGRAMS_PER_SM = 4
DROPOUT_NORM_INTERPRETER_PROGRAMS = 3


def dropout_norm_config(n_cols: int) -> LaunchConfig:
    """Row block (``block_c``, a power of two >= n_cols) and warps of the norm kernels."""
    block = max(16, triton.next_power_of_2(max(n_cols, 1)))
    warps = next((w for limit, w in _DROPOUT_NORM_WARPS if block <= limit), _DROPOUT_NORM_WARPS[-1][1])
    return LaunchConfig(block_c=block, num_warps=warps)


def dropout_norm_programs(device: torch.device, n_rows: int) -> int:
    """Programs of the norm backward kernel: a few per SM, at most one per row."""
    if device.type != "cuda":
        return max(1, min(n_rows, DROPOUT_NORM_INTERPRETER_PROGRAMS))
    sms, _ = _sm_count_and_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_rows, sms * DROPOUT_NORM_PROGRAMS_PER_SM))


# ----------------------------------------------------------------------------------------------
# foreach_norm, total_norm, clip_grad_norm_, l1/l2 penalties (fusedls/backend/triton/foreach_norm.py)
# ----------------------------------------------------------------------------------------------

# Elementwise multi-tensor kernels: elements per chunk and warps. 2048 on 4 warps with 4 chunks
# per item: the fastest setting without spills in benchmarks/tune_foreach_norm.py's H100 sweep
# (docs/norms.md; figures in benchmarks/results/nvidia-h100-80gb-hbm3/README.md). Tests lower
# FOREACH_NORM_BLOCK so tensors span many chunks.
FOREACH_NORM_BLOCK = 2048
FOREACH_NORM_WARPS = 4
# Chunks per work item (a power of two): one program loads CHUNKS x BLOCK elements as one tile
# (all its loads in flight together) after one lookup of its tensor (three dependent loads: item
# -> tensor -> offset / numel), and writes one partial. Model (H100 SXM, bf16, 16-byte loads):
# - needed: ~3.35 TB/s x ~0.7 us DRAM latency ~ 2.3 MB in flight, ~18 KB per SM (132 SMs) at
#   every instant; a program has nothing in flight during its lookup and its reduction / store,
#   so the SM needs several programs, and a maximum of about twice that.
# - registers cap it: bytes in flight need registers, and ptxas (sm_90a, `python -m tools.aot`,
#   8 warps of 4096-element chunks) takes for partial p=2 / map scale, per thread: CHUNKS 1: 32 /
#   44, 2: 48 / 75, 4: 96 / 128, 8: 168 / 254 (capped lower, they spill: 64 elements a thread
#   need ~100). Programs of 256 threads per SM (64K registers, at most 8): 8 / 5, 5 / 3, 2 / 2,
#   1 / 1, so at most 64 / 40, 80 / 48, 64 / 64, 64 / 64 KB of reads in flight per SM.
# - more chunks: fewer lookups per byte but fewer resident programs (none in flight while all of
#   them look up); benchmarks/tune_foreach_norm.py sweeps 1, 2, 4, 8.
# - the merge tail: a 128256 x 2048 embedding (262.7M elements) has ceil(262.7M / (CHUNKS x
#   BLOCK)) partials: 32,064 at 4 x 2048.
FOREACH_NORM_CHUNKS = 4
# The merge kernels (per-tensor partials, then all tensors in one program): partials per step.
# Stage 2 merges a tensor's partials in one program after stage 1: ceil(partials / MERGE_BLOCK)
# dependent steps per pass, two passes for the p-norms (max, then the scaled sum), each step
# ~1 us (its loads, from DRAM: the embedding's partials are written first): 2 x 4 steps for the
# embedding above. 8192 fp32 on 8 warps: 32 a thread, for a and b (~180-220 registers; one program
# per tensor, so occupancy is moot).
FOREACH_NORM_MERGE_BLOCK = 8192
FOREACH_NORM_MERGE_WARPS = 8


@dataclasses.dataclass(frozen=True)
class ForeachNormConfig(LaunchConfig):
    chunks: int = 1  # chunks of block_c elements per work item (elementwise kernels)

    @property
    def item(self) -> int:
        """Elements per work item."""
        return self.chunks * self.block_c


def foreach_norm_config() -> ForeachNormConfig:
    """Chunk (``block_c``), chunks per work item and warps of the elementwise kernels."""
    return ForeachNormConfig(block_c=FOREACH_NORM_BLOCK, num_warps=FOREACH_NORM_WARPS, chunks=FOREACH_NORM_CHUNKS)


def foreach_norm_merge_config() -> LaunchConfig:
    """Partials per step (``block_c``) and warps of the merge kernels."""
    return LaunchConfig(block_c=FOREACH_NORM_MERGE_BLOCK, num_warps=FOREACH_NORM_MERGE_WARPS)


# ----------------------------------------------------------------------------------------------
# vector_norm (fusedls/backend/triton/vector_norm.py)
# ----------------------------------------------------------------------------------------------

# Elements of one (BLOCK_R, BLOCK_N) tile per element size in bytes: BLOCK_N = the row length
# rounded up to a power of two, at most the tile; BLOCK_R = tile // BLOCK_N rows side by side
# (many short rows per program). 8192 bf16 on 8 warps: 32 elements, four 16-byte loads a thread.
VECTOR_NORM_TILE = {2: 8192, 4: 4096}
VECTOR_NORM_WARPS = 8
# At most this many rows per tile: 512 rows of 16 took all 255 registers (sm_80, 8 warps).
VECTOR_NORM_MAX_BLOCK_R = 64
VECTOR_NORM_SMALL_TILE_WARPS = 4  # tiles of at most 1024 elements (rows shorter than that, few rows)
# Persistent forward, row path: at most this many programs per SM, each looping over row blocks;
# far more than fit at once (~80 registers x 256 threads: 3 per SM), so the hardware keeps every
# SM full as programs finish, and each loops only a few times (a short tail).
VECTOR_NORM_PROGRAMS_PER_SM = 16
# Split path: rows x slices ~ this many programs per SM, all resident at once (8 warps at up to
# 128 registers), each streaming its slice.
VECTOR_NORM_SPLIT_PROGRAMS_PER_SM = 2
# Split path: a row of at least 2 * VECTOR_NORM_SPLIT_COLS elements, when the row blocks alone
# cannot give every program work, is cut into slices of at least this many columns (a multiple
# of BLOCK_N), reduced to fp32 partials by the programs of stage 1 and merged in order by stage 2.
VECTOR_NORM_SPLIT_COLS = 16384
# SM count assumed off CUDA (the interpreter), where no device can be asked.
VECTOR_NORM_INTERPRETER_SMS = 2
# Stage 2 merges a row's partials in chunks of at most this many.
VECTOR_NORM_MERGE_BLOCK = 1024
VECTOR_NORM_MERGE_WARPS = 4


@dataclasses.dataclass(frozen=True)
class VectorNormConfig:
    block_r: int  # rows per tile
    block_n: int  # columns per tile (a power of two)
    num_warps: int

    def launch_options(self) -> dict:
        return LaunchConfig(self.block_n, self.num_warps).launch_options()


def vector_norm_config(n_rows: int, n_cols: int, element_size: int) -> VectorNormConfig:
    """Tile and warps of the vector_norm kernels for (n_rows, n_cols) rows of ``element_size``-byte data."""
    tile = VECTOR_NORM_TILE.get(element_size, VECTOR_NORM_TILE[4])
    block_n = max(16, min(triton.next_power_of_2(max(n_cols, 1)), tile))
    block_r = max(1, min(tile // block_n, VECTOR_NORM_MAX_BLOCK_R, triton.next_power_of_2(max(n_rows, 1))))
    warps = VECTOR_NORM_WARPS if block_r * block_n > 1024 else VECTOR_NORM_SMALL_TILE_WARPS
    return VectorNormConfig(block_r, block_n, warps)


def vector_norm_sms(device: torch.device) -> int:
    """SMs of ``device`` (asked once, lazily), or VECTOR_NORM_INTERPRETER_SMS off CUDA."""
    if device.type != "cuda":
        return VECTOR_NORM_INTERPRETER_SMS
    return _sm_count_and_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())[0]


def vector_norm_split(device: torch.device, n_row_blocks: int, n_cols: int, block_n: int) -> tuple[int, int]:
    """(splits, columns per split) of each row: (1, n_cols) unless the row is long and the row
    blocks too few to occupy every SM; slices are multiples of block_n and never empty."""
    programs = vector_norm_sms(device) * VECTOR_NORM_SPLIT_PROGRAMS_PER_SM
    if n_cols < 2 * VECTOR_NORM_SPLIT_COLS or n_row_blocks >= programs:
        return 1, n_cols
    splits = min(n_cols // VECTOR_NORM_SPLIT_COLS, triton.cdiv(programs, n_row_blocks))
    per_split = triton.cdiv(triton.cdiv(n_cols, splits), block_n) * block_n
    return triton.cdiv(n_cols, per_split), per_split


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy, strategy="fused" (fusedls/backend/triton/linear_cross_entropy.py)
# ----------------------------------------------------------------------------------------------

# Per element size of the inputs (2: bf16/fp16 through the tensor cores; 4: fp32 with
# input_precision="ieee", an FMA-based dot whose operands take registers, hence smaller tiles):
# - tile (rows, classes): the GEMM tile of the statistics and gradient kernels and the unit the
#   filter skips (fusedls/backend/eager/linear_cross_entropy.py's TILE is the same). 128 x 128 fp32
#   is 64 accumulator registers a thread on 8 warps, leaving room for the epilogue's exp and
#   reductions without spills (python -m tools.aot --kernel lce_stats,lce_grad,lce_dw,lce_dh).
# - block_k: the hidden-size step; 32 (64 takes up to 255 registers and spills with the epilogue).
# - block_d: hidden-size columns per program of the filtered products (a tile x block_d accumulator).
# - warps of the GEMMs and of the products; stages of the software pipeline of the K loops
#   (3 x (128 + 128) x 32 bf16 = 48 KiB of shared memory). fp32: 8 warps and block_d 32 (4 warps
#   or block_d 64: ptxas keeps 32 registers and spills kilobytes in the products on sm_80), 3
#   stages (16 KiB; with 1 or 2 ptxas keeps 128 registers in the statistics kernel on sm_90a and
#   spills 16-40 B with the cap or TILE_MAX).
# - softcap_row_divisor: the gradient kernel's rows per tile are divided by it under the soft cap
#   (tanh and sech^2 of the tile on top of the 64 accumulators take 255 registers and spill on
#   sm_90a at 128 rows; 154 at 64). The filter, whose unit is the tile, is refused with the cap.
# Tests lower the tiles and block_k to 16.
FUSED_TILE = {2: (128, 128), 4: (64, 64)}
FUSED_BLOCK_K = {2: 32, 4: 16}
FUSED_BLOCK_D = {2: 128, 4: 32}
FUSED_WARPS = {2: 8, 4: 8}
FUSED_PRODUCT_WARPS = {2: 8, 4: 8}
# Warps of the gradient kernel: fp32 takes 4 (at 8 ptxas keeps 80 registers on sm_90a and spills 8 B).
FUSED_GRAD_WARPS = {2: 8, 4: 4}
FUSED_STAGES = {2: 3, 4: 3}
FUSED_SOFTCAP_ROW_DIVISOR = {2: 2, 4: 1}
# Row tiles per group of the gradient kernel's program order (consecutive programs share the
# hidden rows and the head's tiles in L2, as in a grouped GEMM).
FUSED_GROUP = 8
# Statistics kernel: each row tile's classes are split over programs (deterministic merge after):
# enough programs for this many per SM (a few waves), at most one per class tile. Off CUDA (the
# interpreter) FUSED_INTERPRETER_SPLITS splits, so the merge is tested.
FUSED_PROGRAMS_PER_SM = 8
FUSED_INTERPRETER_SPLITS = 2


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    block_n: int  # rows (tokens) per logits tile
    block_v: int  # classes per logits tile
    block_k: int  # hidden-size step of the logits GEMM
    block_d: int  # hidden-size columns per program of the filtered products
    num_warps: int
    num_stages: int
    group: int  # row tiles per group of the gradient kernel's program order
    product_warps: int  # warps of the filtered products
    softcap_block_n: int  # rows per tile of the gradient kernel under the soft cap
    grad_warps: int  # warps of the gradient kernel

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    def grad_block_n(self, softcap: bool) -> int:
        """Rows per tile of the gradient kernel."""
        return self.softcap_block_n if softcap else self.block_n


def fused_config(element_size: int) -> FusedConfig:
    """Tiles, warps and stages of the fused linear cross-entropy kernels for inputs of ``element_size`` bytes."""
    size = 2 if element_size <= 2 else 4
    rows, cols = FUSED_TILE[size]
    capped_rows = max(16, rows // FUSED_SOFTCAP_ROW_DIVISOR[size])  # tl.dot takes 16 rows at least
    return FusedConfig(rows, cols, FUSED_BLOCK_K[size], FUSED_BLOCK_D[size], FUSED_WARPS[size], FUSED_STAGES[size],
                       FUSED_GROUP, FUSED_PRODUCT_WARPS[size], capped_rows, FUSED_GRAD_WARPS[size])  # fmt: skip


def fused_splits(device: torch.device, n_row_tiles: int, n_col_tiles: int) -> int:
    """Programs per row tile of the statistics kernel: FUSED_PROGRAMS_PER_SM per SM in all, at
    most one per class tile; off CUDA FUSED_INTERPRETER_SPLITS."""
    if device.type != "cuda":
        return max(1, min(n_col_tiles, FUSED_INTERPRETER_SPLITS))
    sms, _ = _sm_count_and_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_col_tiles, -(-sms * FUSED_PROGRAMS_PER_SM // max(n_row_tiles, 1))))
