"""Pure torch: batches of packed rows, attention that stays inside samples, token-normalised loss.

Rows from `jobs.prepare` hold several samples back to back (`seq_lens`, `position_ids`
restarting at 0). On sdpa/eager attention a block-diagonal causal mask keeps each sample from
seeing its neighbours, so a packed row computes exactly what its samples would alone. Flash
attention gets no mask: transformers reads the sample boundaries from `position_ids` (each
restart at 0 opens a sequence) and runs the varlen kernel, which never builds the L x L mask;
it does so only for a batch of one row, so the micro-batch's rows are laid end to end in one
row without padding (as TRL's padding-free collator does). Flex attention takes the same single
row with a document mask (`BlockMask`: same sample and causal). No loss crosses a row boundary
there: the first token of every sample carries no label.

The loss of a step is the sum of token losses over every trainable token of the *effective*
batch (all micro-batches of the step, on all workers) divided by that token count. Each
micro-batch contributes `sum / tokens_in_step`, so gradient accumulation and the micro-batch size
do not change the result (a per-micro-batch mean would weight short batches up).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from jobs.common.contract import IGNORE_INDEX
from jobs.train.spec import Attention


def collate(rows: Sequence[dict[str, np.ndarray]], pad_id: int,
            attention: Attention = Attention.SDPA) -> dict[str, torch.Tensor]:
    """The micro-batch as `attention` keeps its samples apart: rows (input_ids, labels,
    position_ids, seq_lens) padded to the longest with a block-diagonal causal mask (sdpa, eager),
    or laid end to end in one row (flash attention reads `position_ids`; flex gets a document mask)."""
    if attention in (Attention.FLASH_ATTENTION_2, Attention.FLEX_ATTENTION):
        seq_lens = np.concatenate([r["seq_lens"] for r in rows])
        parts = {key: [r[key] for r in rows] for key in ("input_ids", "labels", "position_ids")}
        if attention is Attention.FLEX_ATTENTION:
            # Flex attention is compiled per shape: padding the row to a power of two bounds the
            # compilations to a handful per run (the padding is a sample of its own, untrained).
            total = int(seq_lens.sum())
            padding = max(FLEX_MIN_LENGTH, 1 << (total - 1).bit_length()) - total
            parts["input_ids"].append(np.full(padding, pad_id))
            parts["labels"].append(np.full(padding, IGNORE_INDEX))
            parts["position_ids"].append(np.arange(padding))
            seq_lens = np.append(seq_lens, padding) if padding else seq_lens
        flat = {key: torch.as_tensor(np.concatenate(values), dtype=torch.long)[None] for key, values in parts.items()}
        if attention is Attention.FLEX_ATTENTION:
            flat["attention_mask"] = document_mask(seq_lens)
        return flat
    # Filled in numpy, whose rows may be read-only views of Arrow buffers, then handed to torch once.
    shape = (len(rows), max(len(r["input_ids"]) for r in rows))
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)  # -1: padding
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n], labels[b, :n], position_ids[b, :n] = row["input_ids"], row["labels"], row["position_ids"]
        segments[b, :n] = np.repeat(np.arange(len(row["seq_lens"])), row["seq_lens"])
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids), "attention_mask": block_causal_mask(torch.from_numpy(segments))}


FLEX_MIN_LENGTH = 128  # flex attention's block size


def static_flex_shapes() -> None:
    """Compile flex attention for each row length as it is (a handful: `collate` pads to powers of
    two). torch 2.13's inductor fails to compile flex attention on CPU for dynamic shapes, which
    it switches to after the second distinct length."""
    import torch._dynamo

    torch._dynamo.config.automatic_dynamic_shapes = False


def document_mask(seq_lens: np.ndarray):
    """Flex attention's `BlockMask` over one row of samples of these lengths: a token sees the
    tokens before it in its own sample."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.as_tensor(seq_lens, dtype=torch.long)
    document = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    total = int(lengths.sum())

    def same_sample_causal(batch, head, q, kv):
        return (document[q] == document[kv]) & (q >= kv)

    return create_block_mask(same_sample_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cpu")


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch on the worker's device, labels included (engines move only the model's
    inputs, if any; the loss compares the logits with the labels). A flex `BlockMask` moves too."""
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward: everything but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask: token i sees token j iff same sample and j <= i.

    Padding (segment -1) sees only itself, so no softmax row is empty (an all-masked row is NaN)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    pad_self = (segments[:, :, None] == -1) & torch.eye(length, dtype=torch.bool)
    allowed = (same & causal & (segments[:, :, None] >= 0)) | pad_self
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained tokens, and how many there were."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shifted_labels != IGNORE_INDEX).sum())


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss in a collated batch (a step's normaliser is the sum over its micro-batches)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step_tokens: int,
                     world_size: int = 1) -> torch.Tensor:
    """This micro-batch's share of the step loss. DDP and DeepSpeed average gradients over workers,
    so multiplying by `world_size` makes the reduced gradient that of sum / step_tokens."""
    logits = model(**model_inputs(batch)).logits
    total, _ = token_loss_sum(logits, batch["labels"])
    return total * world_size / max(step_tokens, 1)
