"""The model runner: turns a scheduled step into tensors, runs the model, samples. Only it touches tensors.

Legend: T tokens in the step, B sequences, S sampled sequences, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemesh.engine.attention import PagedAttention, StepLayout
from moemesh.engine.kv_cache import LatentKVCache
from moemesh.engine.sampling import Sampler, SampleResult, SamplingRow, logprobs_of
from moemesh.engine.scheduler import ScheduledBatch, ScheduledSeq
from moemesh.ep.tbo import split_point, two_batch_forward
from moemesh.kernels.backends import DecodeKernel
from moemesh.model.deepseek import DeepseekForCausalLM


class ModelRunner:
    def __init__(self, model: DeepseekForCausalLM, cache: LatentKVCache, sampler: Sampler,
                 eos_token_ids: Sequence[int] = (), decode_kernel: DecodeKernel | None = None) -> None:
        """`decode_kernel`: the kernel set's decode attention over the paged cache, if it has one."""
        self.model = model
        self.decode_kernel = decode_kernel
        self.cache = cache
        self.sampler = sampler
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = next(model.parameters()).device

    def prepare(self, seqs: Sequence[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, StepLayout, list[int]]:
        """-> input_ids [T] int64, positions [T] int64, the attention layout, and the rows to sample."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        prefill: list[tuple[slice, torch.Tensor | None]] = []
        decode_rows: list[int] = []
        decode_seqs: list[tuple[list[int], int]] = []  # (page table, KV length)
        sample_rows: list[int] = []
        row = 0
        for s in seqs:
            req, n, end = s.request, s.num_new_tokens, s.start + s.num_new_tokens
            ids.extend(req.all_token_ids[s.start:end])
            positions.append(torch.arange(s.start, end, device=self.device))
            kv_slots = self.cache.slots(req.pages, 0, end)
            slot_parts.append(kv_slots[s.start:])
            if n == 1:
                decode_rows.append(row)
                decode_seqs.append((req.pages, end))
            else:
                prefill.append((slice(row, row + n), kv_slots if s.start else None))
            row += n
            if s.sample:
                sample_rows.append(row - 1)
        slot_mapping = torch.cat(slot_parts) if slot_parts else torch.empty(0, dtype=torch.int64, device=self.device)
        layout = StepLayout(slot_mapping=slot_mapping, prefill=prefill)
        if decode_rows:
            ps = self.cache.page_size
            p_max = max(-(-n // ps) for _, n in decode_seqs)
            # Padding repeats page 0: its rows are read but masked out.
            table = [pages[: -(-n // ps)] + [0] * (p_max - -(-n // ps)) for pages, n in decode_seqs]
            lens = torch.tensor([n for _, n in decode_seqs], dtype=torch.int64, device=self.device)
            layout.decode_rows = torch.tensor(decode_rows, dtype=torch.int64, device=self.device)
            layout.decode_pages = torch.tensor(table, dtype=torch.int64, device=self.device)
            layout.decode_lens = lens
            layout.decode_mask = torch.arange(p_max * ps, device=self.device)[None, :] < lens[:, None]
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        pos = torch.cat(positions) if positions else torch.empty(0, dtype=torch.int64, device=self.device)
        return input_ids, pos, layout, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, split: bool = False) -> SampleResult:
        """Compute the step's KV and sample one token for every sequence with `sample` set, in order.

        `split`: as two micro-batches whose MoE communication overlaps the other's compute (same tokens).
        """
        hidden, sample_rows = self._forward(list(batch.seqs), split)
        if any(s.request.prompt_logprobs is not None for s in batch.seqs):
            self._prompt_logprobs(batch.seqs, hidden)
        rows = [self._sampling_row(s.request) for s in batch.seqs if s.sample]
        if not rows:
            return SampleResult([], [], [])
        logits = self.model.compute_logits(hidden[sample_rows])
        return self.sampler(logits, rows)

    @torch.inference_mode()
    def run_empty(self, split: bool = False) -> None:
        """A forward over no tokens: an EP rank without work joining its peers' collectives."""
        self._forward([], split)

    def _forward(self, seqs: list[ScheduledSeq], split: bool) -> tuple[torch.Tensor, list[int]]:
        """-> final hidden states [T, D] of the batch's tokens, and the rows to sample."""
        if not split:
            input_ids, positions, layout, sample_rows = self.prepare(seqs)
            return self.model(input_ids, positions, PagedAttention(self.cache, layout, self.decode_kernel)), sample_rows
        k = split_point([s.num_new_tokens for s in seqs]) if len(seqs) >= 2 else len(seqs)
        parts, sample_rows, offset = [], [], 0
        for half in (seqs[:k], seqs[k:]):
            input_ids, positions, layout, rows = self.prepare(half)
            parts.append((input_ids, positions, PagedAttention(self.cache, layout, self.decode_kernel)))
            sample_rows += [offset + r for r in rows]
            offset += input_ids.shape[0]
        return torch.cat(two_batch_forward(self.model, parts)), sample_rows

    def _prompt_logprobs(self, seqs: Sequence[ScheduledSeq], hidden: torch.Tensor) -> None:
        """For requests that asked for prompt logprobs: each prompt token's logprob (and top-N) given the tokens
        before it, from this step's rows of hidden [T, D], into `request.prompt_logprobs` by position."""
        row = 0
        for s in seqs:
            req = s.request
            last = min(s.start + s.num_new_tokens, len(req.prompt_token_ids) - 1)  # positions with a prompt next
            if req.prompt_logprobs is not None and last > s.start:
                k = last - s.start
                targets = torch.tensor(req.prompt_token_ids[s.start + 1:last + 1], device=hidden.device)
                chosen, tops = logprobs_of(self.model.compute_logits(hidden[row:row + k]), targets,
                                           req.params.prompt_logprobs or 0)
                for j in range(k):
                    req.prompt_logprobs[s.start + 1 + j] = (chosen[j], tops[j])
            row += s.num_new_tokens

    def _sampling_row(self, req) -> SamplingRow:
        p = req.params
        banned: tuple[int, ...] = ()
        if req.num_output_tokens < p.min_tokens:
            banned = p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids)
        return SamplingRow(p, req.generator, req.prompt_token_ids, req.output_token_ids, banned, req.grammar)
