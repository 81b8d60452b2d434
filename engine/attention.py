"""Attention backends: store a step's K/V into the paged cache, then attend.

The runner builds one ``AttentionMetadata`` per step (nano-vllm style) and
passes it down to every layer explicitly; nothing lives in module globals.
Backends: ``cpu`` (the C kernel of ``splitserve.kernels.cpu_attention`` for
decode rows and short chunks, torch's flash attention for long prefill
chunks), ``torch`` (pure torch, anywhere; the fallback) and ``triton`` (CUDA;
``splitserve.kernels`` kernels, imported lazily).
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from splitserve.engine.models.rotary import RopeTable
    from splitserve.kernels.cpu_attention import CPUPagedAttention
    from splitserve.kernels.cpu_layer_ops import CPULayerOps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionMetadata:
    """The step's layout, shared by all layers.

    ``slot_mapping[t]``: cache slot (``block * block_size + offset``) of token
    row ``t``. ``block_tables[s]``: sequence ``s``'s blocks (padded with 0).
    ``seq_lens[s]``: context length after this step (cached + new).
    ``query_start_loc``: row offsets of each sequence's new tokens, ``[S+1]``.
    ``decode_only``: every sequence has exactly one new row.
    """

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    max_query_len: int
    max_seq_len: int
    decode_only: bool
    # Built once per decode-only step by the runner and shared by every layer
    # (None: the backend derives one group): see ``decode_groups``.
    decode_groups: tuple[DecodeGroup, ...] | None = None
    # CPU: each token row's row in the cache viewed as [num_blocks * num_layers
    # * 2 * block_size, KVH * D], for layer 0's K (None: use slot_mapping).
    cache_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows of similar context length, attended together.

    ``rows``: the group's rows of the step (None: all, in order); ``blocks``
    [R, nb] int64 covering the group's longest context; ``bias`` [R, 1,
    nb * block_size] additive key mask (0 inside each row's context, -inf past it).
    """

    rows: torch.Tensor | None
    blocks: torch.Tensor
    bias: torch.Tensor


class AttentionBackend(ABC):
    """Writes K/V and computes paged causal attention for one layer at a time."""

    name: str
    # Whether ``rope_store`` is implemented (rotary + store in one pass).
    can_rope_store: bool = False

    def rope_store(self, qkv: torch.Tensor, rope: RopeTable, num_heads: int, kv_cache: torch.Tensor,
                   layer: int, metadata: AttentionMetadata) -> torch.Tensor:
        """Rotate q and k of the fused projection ``qkv`` [T, (H + 2 * KVH) * D],
        store k and v like ``store_kv``; returns the rotated query [T, H, D]."""
        raise NotImplementedError(f"the {self.name} attention backend has no rope_store")

    @abstractmethod
    def store_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 layer: int, metadata: AttentionMetadata) -> None:
        """Scatter ``key``/``value`` [T, KVH, D] into ``kv_cache`` at ``metadata.slot_mapping``."""

    @abstractmethod
    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of ``query`` [T, H, D] over the cached context (the step's
        K/V already stored); returns [T, H, D] in ``query``'s dtype."""


class TorchAttentionBackend(AttentionBackend):
    """The kernels' math in torch: store via ``store_kv_reference``; attention
    in fp32 like ``paged_attention_reference``, vectorised over the rows of a
    decode-only step, and one sequence at a time (SDPA) otherwise."""

    name = "torch"

    def __init__(self) -> None:
        self.workspace = Workspace()

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 layer: int, metadata: AttentionMetadata) -> None:
        if metadata.cache_rows is None:
            from splitserve.kernels.store_kv import store_kv_reference

            store_kv_reference(key, value, kv_cache, layer, metadata.slot_mapping)
            return
        num_blocks, num_layers, _, block_size, kvh, d = kv_cache.shape
        rows = kv_cache.view(num_blocks * num_layers * 2 * block_size, kvh * d)
        k_rows = metadata.cache_rows + layer * 2 * block_size
        rows.index_copy_(0, k_rows, key.reshape(-1, kvh * d).to(kv_cache.dtype))
        rows.index_copy_(0, k_rows + block_size, value.reshape(-1, kvh * d).to(kv_cache.dtype))

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        if metadata.decode_only:
            groups = metadata.decode_groups
            if groups is None:
                groups = (decode_group(None, metadata.block_tables, metadata.seq_lens,
                                       metadata.max_seq_len, kv_cache.shape[3]),)
            if len(groups) == 1 and groups[0].rows is None:
                g = groups[0]
                return _decode_attention(query, kv_cache, layer, g.blocks, g.bias, scale, self.workspace)
            out = torch.empty_like(query)
            for g in groups:
                out[g.rows] = _decode_attention(query[g.rows], kv_cache, layer, g.blocks, g.bias, scale,
                                                self.workspace)
            return out
        return _varlen_attention(query, kv_cache, layer, metadata, scale)


class CPUAttentionBackend(TorchAttentionBackend):
    """The C paged-attention kernels (``splitserve.kernels.cpu_attention``),
    which read K/V blocks in place: one row at a time for every sequence with
    at most ``max_kernel_rows`` new rows, tiles of rows (flash attention) for
    longer prefill chunks. Where this build cannot tile the shapes (no
    AVX-512, head_dim not a multiple of 16), long chunks go through the torch
    path's per-sequence SDPA.

    ``fresh_prefill_sdpa``: a long chunk that is its sequence's whole context
    (no cached prefix) goes to torch's flash-attention SDPA in the cache dtype
    instead, where that is the faster path (``sdpa_prefill_is_faster``: bf16
    on a CPU with AMX, whose tile matmuls torch's kernel uses: 512 rows
    1.1 ms vs 2.4 ms for the tiled kernel). There, as in vLLM's AMX path,
    the softmax weights are rounded to bf16 before they weight V.
    """

    name = "cpu"

    def __init__(self, kernel: CPUPagedAttention, layer_ops: CPULayerOps | None = None,
                 max_kernel_rows: int = 16, fresh_prefill_sdpa: bool = False) -> None:
        super().__init__()
        self.kernel = kernel
        self.layer_ops = layer_ops
        self.can_rope_store = layer_ops is not None
        self.max_kernel_rows = max_kernel_rows
        self.fresh_prefill_sdpa = fresh_prefill_sdpa

    def rope_store(self, qkv: torch.Tensor, rope: RopeTable, num_heads: int, kv_cache: torch.Tensor,
                   layer: int, metadata: AttentionMetadata) -> torch.Tensor:
        if self.layer_ops is None or metadata.cache_rows is None:
            raise NotImplementedError("rope_store needs the CPU layer ops and the step's cache rows")
        return self.layer_ops.rope_store(qkv, num_heads, kv_cache.shape[4], rope.cos_cache, rope.sin_cache,
                                         rope.positions, kv_cache, metadata.cache_rows, layer)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty(query.shape, dtype=query.dtype)
        self.kernel.forward(query, kv_cache, layer, metadata.block_tables, metadata.seq_lens,
                            metadata.query_start_loc, scale, metadata.max_seq_len, out,
                            max_rows_per_seq=self.max_kernel_rows)
        if metadata.max_query_len > self.max_kernel_rows:
            min_rows = self.max_kernel_rows + 1
            if not self.kernel.can_tile(kv_cache.shape[5], kv_cache.shape[3]):
                _varlen_attention(query, kv_cache, layer, metadata, scale, out=out, min_rows=min_rows)
            elif not self.fresh_prefill_sdpa or query.dtype != kv_cache.dtype:
                self.kernel.forward_tiled(query, kv_cache, layer, metadata.block_tables, metadata.seq_lens,
                                          metadata.query_start_loc, scale, out, min_rows=min_rows)
            else:
                for first, end in _fresh_prefill_sdpa(query, kv_cache, layer, metadata, scale, out, min_rows):
                    self.kernel.forward_tiled(query, kv_cache, layer, metadata.block_tables[first:end],
                                              metadata.seq_lens[first:end], metadata.query_start_loc[first:end + 1],
                                              scale, out, min_rows=min_rows)
        return out


def sdpa_prefill_is_faster(dtype: torch.dtype, cpu_flags: frozenset[str]) -> bool:
    """Whether torch's SDPA beats the tiled C kernel on a fresh prefill chunk:
    in bf16 where the CPU has AMX (measured 2.2x at 512 rows, 8/4 heads x 64;
    without AMX, e.g. AVX512_BF16 alone, the tiled kernel was 1.7x faster)."""
    return dtype == torch.bfloat16 and "amx_bf16" in cpu_flags


def _fresh_prefill_sdpa(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, metadata: AttentionMetadata,
                        scale: float, out: torch.Tensor, min_rows: int) -> list[tuple[int, int]]:
    """SDPA in the cache dtype for each sequence with at least ``min_rows``
    rows that are its whole context; returns the runs ``[first, end)`` of the
    other sequences with that many rows (their rows of ``out`` untouched)."""
    starts = metadata.query_start_loc.tolist()
    lens = metadata.seq_lens.tolist()
    h, d = query.shape[1], query.shape[2]
    block_size, kvh = kv_cache.shape[3], kv_cache.shape[4]
    rest: list[tuple[int, int]] = []
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len < min_rows:
            continue
        if q_len != seq_len:
            if rest and rest[-1][1] == s:
                rest[-1] = (rest[-1][0], s + 1)
            else:
                rest.append((s, s + 1))
            continue
        blocks = metadata.block_tables[s, :-(-seq_len // block_size)].long()
        kv = kv_cache[blocks, layer]  # [nb, 2, bs, KVH, D], one copy of the context
        k = kv[:, 0].reshape(-1, kvh, d)[:seq_len].transpose(0, 1).unsqueeze(0)
        v = kv[:, 1].reshape(-1, kvh, d)[:seq_len].transpose(0, 1).unsqueeze(0)
        q = query[q_start:q_end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=kvh != h)
        out[q_start:q_end] = o[0].transpose(0, 1)
    return rest


class TritonAttentionBackend(AttentionBackend):
    """``splitserve.kernels`` Triton kernels (CUDA, or the interpreter in tests)."""

    name = "triton"

    def __init__(self) -> None:
        try:
            from splitserve.kernels.paged_attention import paged_attention
            from splitserve.kernels.store_kv import store_kv
        except ImportError as exc:
            raise RuntimeError(
                "the triton attention backend needs triton and splitserve.kernels' store_kv / "
                f"paged_attention launchers ({exc}); use --attention-backend torch"
            ) from exc
        self._store_kv = store_kv
        self._paged_attention = paged_attention

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 layer: int, metadata: AttentionMetadata) -> None:
        self._store_kv(key, value, kv_cache, layer, metadata.slot_mapping)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        # The runner built the batch, so its maxima are known on the host:
        # skip the kernel's content checks (one device sync per layer).
        return self._paged_attention(query, kv_cache, layer, metadata.block_tables,
                                     metadata.seq_lens, metadata.query_start_loc, scale,
                                     validate=False, max_query_len=metadata.max_query_len,
                                     max_seq_len=metadata.max_seq_len)


def select_backend(name: str, device: torch.device, head_dim: int, block_size: int,
                   dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """``auto`` is ``triton`` on CUDA when the kernels support ``head_dim`` and
    ``block_size``, ``cpu`` on the CPU when its kernel builds and takes
    ``dtype``, else ``torch``; an explicit ``triton`` or ``cpu`` that cannot
    serve is an error saying why."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            problem = _triton_shape_problem(head_dim, block_size)
            if problem is None:
                name = "triton"
            else:
                logger.warning("attention backend: torch, since %s", problem)
        elif device.type == "cpu":
            kernel = _cpu_kernel(dtype)
            if kernel is not None:
                return _cpu_backend(kernel, dtype)
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"--attention-backend cpu needs --device cpu, got {device.type}")
        kernel = _cpu_kernel(dtype)
        if kernel is None:
            raise ValueError(f"--attention-backend cpu: the C kernel takes float32/bfloat16 and needs a C "
                             f"compiler (got {dtype}; see the log); use --attention-backend torch")
        return _cpu_backend(kernel, dtype)
    if name == "triton":
        problem = _triton_shape_problem(head_dim, block_size)
        if problem is not None:
            raise ValueError(f"--attention-backend triton: {problem}; use --attention-backend torch")
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or triton")


def _cpu_kernel(dtype: torch.dtype) -> CPUPagedAttention | None:
    from splitserve.kernels.cpu_attention import SUPPORTED_DTYPES, CPUPagedAttention

    if dtype not in SUPPORTED_DTYPES:
        return None
    return CPUPagedAttention.load()


def _cpu_backend(kernel: CPUPagedAttention, dtype: torch.dtype) -> CPUAttentionBackend:
    from splitserve.kernels.cpu_isa import CpuInfo

    return CPUAttentionBackend(kernel, _cpu_layer_ops(),
                               fresh_prefill_sdpa=sdpa_prefill_is_faster(dtype, CpuInfo.current().flags))


def _cpu_layer_ops() -> CPULayerOps | None:
    from splitserve.kernels.cpu_layer_ops import CPULayerOps

    return CPULayerOps.load()


def _triton_shape_problem(head_dim: int, block_size: int) -> str | None:
    from splitserve.kernels.paged_attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS

    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"the Triton kernels support head_dim {SUPPORTED_HEAD_DIMS}, the model has {head_dim}"
    if block_size not in SUPPORTED_BLOCK_SIZES:
        return f"the Triton kernels support --block-size {SUPPORTED_BLOCK_SIZES}, got {block_size}"
    return None


def _gather_context(kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                    num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``num_tokens`` positions for each row of
    ``block_tables``: [S, KVH, L, D] each, fp32."""
    num_blocks = -(-num_tokens // kv_cache.shape[3])
    blocks = block_tables[:, :num_blocks].long()
    s, kvh, d = blocks.shape[0], kv_cache.shape[4], kv_cache.shape[5]
    # Indexing K and V apart yields contiguous [S, nb, bs, KVH, D] copies, so
    # the reshape below is free (one copy of the context per layer, not two).
    k = kv_cache[blocks, layer, 0].view(s, -1, kvh, d)[:, :num_tokens].transpose(1, 2).float()
    v = kv_cache[blocks, layer, 1].view(s, -1, kvh, d)[:, :num_tokens].transpose(1, 2).float()
    return k, v


def decode_group(rows: torch.Tensor | None, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 max_seq_len: int, block_size: int) -> DecodeGroup:
    """The ``DecodeGroup`` of ``block_tables``/``seq_lens`` (already the group's rows)."""
    num_blocks = -(-max_seq_len // block_size)
    blocks = block_tables[:, :num_blocks].long()
    positions = torch.arange(num_blocks * block_size, device=block_tables.device)
    bias = torch.zeros(blocks.shape[0], 1, positions.shape[0], dtype=torch.float32, device=block_tables.device)
    bias.masked_fill_((positions[None, :] >= seq_lens[:, None])[:, None, :], float("-inf"))
    return DecodeGroup(rows, blocks, bias)


def decode_groups(block_tables: torch.Tensor, seq_lens: list[int], block_size: int,
                  max_groups: int = 4, min_rows: int = 8) -> tuple[DecodeGroup, ...]:
    """Split a decode step's rows by context length into up to ``max_groups``
    groups of at least ``min_rows``: each group pads only to its own longest
    context, which cuts the gathered bytes (the decode cost) when lengths vary."""
    order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
    num = max(1, min(max_groups, len(order) // min_rows))
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=block_tables.device)
    if num == 1:
        return (decode_group(None, block_tables, lens, max(seq_lens), block_size),)
    groups = []
    size = -(-len(order) // num)
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        rows = torch.tensor(chunk, dtype=torch.int64, device=block_tables.device)
        groups.append(decode_group(rows, block_tables[rows], lens[rows], seq_lens[chunk[-1]], block_size))
    return tuple(groups)


class Workspace:
    """Reusable scratch tensors, grown geometrically and never shrunk.

    A decode step's gathered context is tens of MB per layer; allocating it
    fresh each time makes glibc mmap it and the first touch page-faults every
    page, which costs several times the copy itself.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel + numel // 4, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def _gather_blocks(kv_cache: torch.Tensor, layer: int, which: int, blocks: torch.Tensor,
                   workspace: Workspace) -> torch.Tensor:
    """K (which=0) or V (1) of ``blocks`` [S, nb], head-major in fp32:
    [S * KVH, nb * block_size, D], contiguous so that bmm batches it in one
    call (on strided operands it falls back to one small matmul per matrix).
    The block copy then the transpose beat selecting from a head-major view."""
    s, nb = blocks.shape
    bs, kvh, d = kv_cache.shape[3], kv_cache.shape[4], kv_cache.shape[5]
    gathered = workspace.get(f"gather{which}", (s * nb, bs, kvh, d), kv_cache.dtype, kv_cache.device)
    torch.index_select(kv_cache[:, layer, which], 0, blocks.view(-1), out=gathered)
    out = workspace.get(f"heads{which}", (s, kvh, nb, bs, d), torch.float32, kv_cache.device)
    out.copy_(gathered.view(s, nb, bs, kvh, d).permute(0, 3, 1, 2, 4))
    return out.view(s * kvh, nb * bs, d)


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, blocks: torch.Tensor,
                      bias: torch.Tensor, scale: float, workspace: Workspace) -> torch.Tensor:
    """One query row per sequence: two batched matmuls over the gathered
    context with (sequence, KV head) as the batch and the head's query group
    as the rows, so GQA needs no expansion (and no SDPA, whose q_len-1 path
    costs more than the math); fp32 throughout like the reference kernel."""
    s, h, d = query.shape
    kvh = kv_cache.shape[4]
    k = _gather_blocks(kv_cache, layer, 0, blocks, workspace)  # [S * KVH, L, D]
    v = _gather_blocks(kv_cache, layer, 1, blocks, workspace)
    q = query.float().reshape(s * kvh, h // kvh, d)
    width = k.shape[1]
    bias = bias.expand(s, kvh, width).reshape(s * kvh, 1, width)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # [S * KVH, G, L]
    out = torch.bmm(torch.softmax(scores, dim=-1), v)  # [S * KVH, G, D]
    return out.view(s, h, d).to(query.dtype)


def _varlen_attention(query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      metadata: AttentionMetadata, scale: float, out: torch.Tensor | None = None,
                      min_rows: int = 1) -> torch.Tensor:
    """Per-sequence SDPA over the gathered context, for the sequences with at
    least ``min_rows`` new rows (the others' rows of ``out`` are left as is)."""
    h, d = query.shape[1], query.shape[2]
    kvh = kv_cache.shape[4]
    if out is None:
        out = torch.empty_like(query)
    starts = metadata.query_start_loc.tolist()
    lens = metadata.seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len < max(1, min_rows):
            continue
        k, v = _gather_context(kv_cache, layer, metadata.block_tables[s:s + 1], seq_len)
        q = query[q_start:q_end].float().transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        # Causal from the bottom right: row i sits at position seq_len - q_len + i.
        mask = None
        if 1 < q_len < seq_len:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=q_len == seq_len and q_len > 1,
                                           scale=scale, enable_gqa=kvh != h)  # [1, H, q, D]
        out[q_start:q_end] = o[0].transpose(0, 1).to(query.dtype)
    return out
