"""The model runner: turns a ``SchedulerOutput`` into one forward pass and samples.

Like nano-vllm's ``model_runner.py``, each step's input and metadata tensors
are built in one place (``prepare_inputs``) and handed down explicitly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.engine.attention import AttentionBackend, AttentionMetadata, decode_groups, select_backend
from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache, determine_num_blocks
from splitserve.engine.model_config import ModelConfig, resolve_dtype
from splitserve.engine.models.llama import LlamaForCausalLM
from splitserve.engine.projection import can_pack_linears
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampler import Sampler, build_sampling_metadata, token_logprobs
from splitserve.engine.step_io import ModelRunnerOutput, SchedulerOutput
from splitserve.engine.structured.bitmask import BitmaskFiller, PendingBitmask
from splitserve.engine.tokenizer import eos_token_ids
from splitserve.engine.weights import build_model, load_weights

logger = logging.getLogger(__name__)

_PROMPT_LOGPROBS_ROWS = 512


@dataclass(frozen=True)
class StepInputs:
    """The flattened batch of one step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [B] int64: last row of each sampling request


class ModelRunner:
    """Owns the model, the KV cache tensor and the sampler for one device.

    ``kv_cache`` is the whole paged cache (KV transfer registers it once).
    ``execute`` is called by the engine core once per step, on one thread.
    Constrained requests (``Request.matcher``) get their token masks filled
    while the forward runs (``masks``) and applied before sampling.
    Requests computing prompt logprobs (``Request.prompt_logprobs``) get
    logits for their chunk's prompt rows too; the others only for the rows
    they sample from.
    """

    supports_constraints = True

    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, backend: AttentionBackend,
                 max_model_len: int, eos_token_ids: frozenset[int]) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = kv_cache.device
        self.num_blocks = kv_cache.shape[0]
        self.block_size = kv_cache.shape[3]
        self.max_model_len = max_model_len
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = eos_token_ids
        layer_ops = getattr(backend, "layer_ops", None)
        self.sampler = Sampler(layer_ops.argmax if layer_ops is not None else None)
        self.masks = BitmaskFiller(self.device)

    def prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """Token ids, positions, slot mapping and block tables for the step."""
        if self.device.type == "cpu" and all(n == 1 for n in so.num_scheduled_tokens):
            return self._prepare_decode_cpu(so)
        return self._prepare_any(so)

    def _prepare_any(self, so: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        starts = [r.num_computed_tokens for r in so.requests]
        counts = so.num_scheduled_tokens
        seq_lens = [s + n for s, n in zip(starts, counts)]
        input_ids: list[int] = []
        for r, s, e in zip(so.requests, starts, seq_lens):
            input_ids.extend(r.token_ids[s:e])
        num_blocks = [-(-n // bs) for n in seq_lens]
        width = max(num_blocks)
        tables = [r.block_ids[:nb] + [0] * (width - nb) for r, nb in zip(so.requests, num_blocks)]
        for r, nb in zip(so.requests, num_blocks):
            if len(r.block_ids) < nb:
                raise RuntimeError(f"request {r.request_id} has {len(r.block_ids)} blocks, needs {nb}")

        counts_t = torch.tensor(counts, dtype=torch.int64)
        query_start_loc = torch.zeros(len(counts) + 1, dtype=torch.int64)
        torch.cumsum(counts_t, 0, out=query_start_loc[1:])
        # Not torch.repeat_interleave: on CPU it opens a thread team for any two
        # sequences (grain 1), and a team member the OS has parked on a busy
        # core holds the step for a whole time slice (4-8 ms measured).
        seq_index = torch.tensor([s for s, n in enumerate(counts) for _ in range(n)], dtype=torch.int64)
        row_in_seq = torch.arange(int(query_start_loc[-1])) - query_start_loc[:-1][seq_index]
        positions = torch.tensor(starts, dtype=torch.int64)[seq_index] + row_in_seq
        block_tables = torch.tensor(tables, dtype=torch.int32)
        slot_mapping = block_tables[seq_index, positions // bs].long() * bs + positions % bs
        sample_rows = (query_start_loc[1:] - 1)[torch.tensor(so.samples, dtype=torch.bool)]

        dev = self.device
        decode_only = all(n == 1 for n in counts)
        block_tables_d = block_tables.to(dev, non_blocking=True)
        seq_lens_d = torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True)
        groups = cache_rows = None
        if decode_only and dev.type == "cpu" and self.backend.name == "torch":
            groups = decode_groups(block_tables_d, seq_lens, bs)
        if dev.type == "cpu":
            # No padding slots on this path, so every row is a real cache row.
            cache_rows = (slot_mapping // bs) * (self.kv_cache.shape[1] * 2 * bs) + slot_mapping % bs
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev, non_blocking=True),
            block_tables=block_tables_d,
            seq_lens=seq_lens_d,
            query_start_loc=query_start_loc.to(torch.int32).to(dev, non_blocking=True),
            max_query_len=max(counts),
            max_seq_len=max(seq_lens),
            decode_only=decode_only,
            decode_groups=groups,
            cache_rows=cache_rows,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=positions.to(dev, non_blocking=True),
            metadata=metadata,
            sample_rows=sample_rows.to(dev, non_blocking=True),
        )

    def _prepare_decode_cpu(self, so: SchedulerOutput) -> StepInputs:
        """``prepare_inputs`` for a CPU step of one row per sequence: the same
        tensors from plain lists, without the ~15 small torch ops of the
        general path (116 -> 28 us at batch 1, 221 -> 69 us at batch 8)."""
        bs = self.block_size
        positions = [r.num_computed_tokens for r in so.requests]
        num_blocks = [p // bs + 1 for p in positions]
        width = max(num_blocks)
        tables: list[list[int]] = []
        slots: list[int] = []
        for r, p, nb in zip(so.requests, positions, num_blocks):
            if len(r.block_ids) < nb:
                raise RuntimeError(f"request {r.request_id} has {len(r.block_ids)} blocks, needs {nb}")
            tables.append(r.block_ids[:nb] + [0] * (width - nb))
            slots.append(r.block_ids[p // bs] * bs + p % bs)
        rows_per_block = self.kv_cache.shape[1] * 2 * bs
        groups = None
        block_tables = torch.tensor(tables, dtype=torch.int32)
        seq_lens = [p + 1 for p in positions]
        if self.backend.name == "torch":
            groups = decode_groups(block_tables, seq_lens, bs)
        num_rows = len(positions)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=block_tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.arange(num_rows + 1, dtype=torch.int32),
            max_query_len=1,
            max_seq_len=max(seq_lens),
            decode_only=True,
            decode_groups=groups,
            cache_rows=torch.tensor([(t // bs) * rows_per_block + t % bs for t in slots], dtype=torch.int64),
        )
        return StepInputs(
            input_ids=torch.tensor([r.token_ids[p] for r, p in zip(so.requests, positions)], dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            metadata=metadata,
            sample_rows=torch.tensor([i for i, s in enumerate(so.samples) if s], dtype=torch.int64),
        )

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Compute the scheduled chunks into the KV cache; sample one token for
        each request whose ``samples`` flag is set (in order)."""
        so = scheduler_output
        if so.is_empty:
            return ModelRunnerOutput()
        inputs = self.prepare_inputs(so)
        sampling = [r for r, s in zip(so.requests, so.samples) if s]
        constrained = [row for row, r in enumerate(sampling) if r.matcher is not None]
        pending: PendingBitmask | None = None
        if constrained:
            pending = self.masks.start(constrained, [sampling[row].matcher for row in constrained])
        try:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.metadata, self.backend)
        except BaseException:
            if pending is not None:
                pending.wait_quietly()  # the matchers must be idle before anyone touches them again
            raise
        prompt_logprobs = self._prompt_logprobs(so, hidden)
        if not sampling:
            return ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        bitmask = pending.result() if pending is not None else None
        metadata = build_sampling_metadata(sampling, self.vocab_size, self.device, bitmask)
        result = self.sampler(logits, metadata)
        return ModelRunnerOutput(
            request_ids=[r.request_id for r in sampling],
            sampled_token_ids=result.token_ids,
            logprobs=result.logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(self, so: SchedulerOutput, hidden: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """Logprob, rank and top-k of each prompt token whose preceding
        position this step computed, for requests still missing some."""
        rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        owners: list[tuple[str, int]] = []
        offset = 0
        for r, count in zip(so.requests, so.num_scheduled_tokens):
            if r.num_prompt_logprobs_missing > 0:
                # Position p's logits give the logprob of prompt token p + 1.
                first = max(r.num_computed_tokens, len(r.prompt_logprobs or ()))
                last = min(r.num_computed_tokens + count, r.num_prompt_tokens - 1)
                if last > first:
                    rows.extend(range(offset + first - r.num_computed_tokens, offset + last - r.num_computed_tokens))
                    targets.extend(r.token_ids[first + 1:last + 1])
                    ks.extend([r.sampling_params.prompt_logprobs or 0] * (last - first))
                    owners.append((r.request_id, last - first))
            offset += count
        if not rows:
            return {}
        entries: list[TokenLogprobs | None] = []
        for start in range(0, len(rows), _PROMPT_LOGPROBS_ROWS):
            # Slices bound the [rows, vocab] fp32 temporaries of a long chunk.
            index = torch.tensor(rows[start:start + _PROMPT_LOGPROBS_ROWS], device=self.device)
            raw = torch.log_softmax(self.model.compute_logits(hidden[index]).float(), dim=-1)
            target = torch.tensor(targets[start:start + _PROMPT_LOGPROBS_ROWS], device=self.device)
            entries.extend(token_logprobs(raw, target, ks[start:start + _PROMPT_LOGPROBS_ROWS]))
        out: dict[str, list[TokenLogprobs]] = {}
        cursor = 0
        for request_id, n in owners:
            out[request_id] = [e for e in entries[cursor:cursor + n] if e is not None]
            cursor += n
        return out


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    return torch.device(name)


def _activation_reserve(config: ModelConfig, engine_args: EngineArgs, dtype: torch.dtype) -> int:
    # A step's transient peak, estimated rather than profiled: the widest
    # per-token activations (MLP gate + up, qkv, residuals) for the token
    # budget, plus fp32 logits and sampler temporaries for every sequence.
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (3 * config.intermediate_size + 6 * config.hidden_size
                 + 2 * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim) * elem
    sampling = engine_args.max_num_seqs * config.vocab_size * 4 * 8
    return int(1.2 * (engine_args.max_num_batched_tokens * per_token + sampling)) + (256 << 20)


def load_model_runner(engine_args: EngineArgs) -> ModelRunner:
    """Load config, weights and eos ids from ``engine_args.model``; size and
    allocate the KV cache from the memory left (see ``kv_cache``)."""
    if not engine_args.model:
        raise ValueError("--model is required (a Hugging Face model folder)")
    config = ModelConfig.from_pretrained(engine_args.model)
    device = resolve_device(engine_args.device)
    dtype = getattr(torch, resolve_dtype(engine_args.dtype, config.checkpoint_dtype, device.type))
    max_model_len = config.resolve_max_model_len(engine_args.max_model_len)
    model = build_model(config, max_model_len, dtype, device)
    load_weights(model, engine_args.model)
    model.prepare_projections(packed=can_pack_linears(device, dtype), batch_size_hint=engine_args.max_num_seqs)
    model.eval()
    spec = KVCacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, engine_args.block_size, dtype)
    num_blocks = determine_num_blocks(engine_args, spec, device, max_model_len,
                                      _activation_reserve(config, engine_args, dtype))
    kv_cache = allocate_kv_cache(spec, num_blocks, device)
    backend = select_backend(engine_args.attention_backend, device, config.head_dim, engine_args.block_size,
                             dtype)
    model.use_layer_ops(getattr(backend, "layer_ops", None))
    eos = eos_token_ids(engine_args.model, _load_tokenizer_or_none(engine_args.model))
    logger.info("model %s (%s, %s, %s attention), max_model_len %d", engine_args.model,
                config.architecture, str(dtype).removeprefix("torch."), backend.name, max_model_len)
    return ModelRunner(model, kv_cache, backend, max_model_len, eos)


def _load_tokenizer_or_none(model_dir: str) -> object | None:
    # The engine is token-in/token-out; a folder without tokenizer files still
    # serves, with eos ids from the configs alone.
    from splitserve.engine.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except FileNotFoundError:
        return None
