"""Pure: tokenize rendered conversations and build labels from character spans.

A token carries loss when its characters overlap a trainable span of the *whole* rendered text
(looked up with the encoding's char-to-token map: a few calls per span, not a loop over tokens). Tokenizing the prompt and the reply separately and concatenating (the common shortcut)
breaks when BPE merges across the boundary; offsets over the whole text cannot drift that way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jobs.common.contract import IGNORE_INDEX
from jobs.prepare.formats import RowReject
from jobs.prepare.spec import Truncation
from jobs.prepare.templates import Span


@dataclass(frozen=True, slots=True)
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss
    truncated: bool

    @property
    def trainable(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def trained_mask(char_to_token: Callable[[int], int | None], n_tokens: int, spans: list[Span]) -> np.ndarray:
    """True for each token whose characters overlap a span.

    `char_to_token(i)` is the index of the token holding character i (None where no token does,
    e.g. characters a normaliser removed). A span's tokens are those from the token holding its
    first covered character to the one holding its last: a token straddling a span edge counts.
    """
    mask = np.zeros(n_tokens, dtype=bool)
    for start, end in spans:
        first = next((t for c in range(start, end) if (t := char_to_token(c)) is not None), None)
        if first is None:
            continue  # the span holds no token at all
        last = next(t for c in range(end - 1, start - 1, -1) if (t := char_to_token(c)) is not None)
        mask[first:last + 1] = True
    return mask


def build_labels(ids: list[int], char_to_token: Callable[[int], int | None],
                 spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.asarray(ids, dtype=np.int32)
    labels = np.where(trained_mask(char_to_token, len(ids), spans), input_ids, IGNORE_INDEX).astype(np.int32)
    # Nothing precedes the first token, so no position predicts it: never count it as trained
    # (the same whether the sample is later packed or not).
    if len(labels):
        labels[0] = IGNORE_INDEX
    return input_ids, labels


def fit_length(input_ids: np.ndarray, labels: np.ndarray, max_len: int, truncation: Truncation) -> Tokenized:
    """Apply the truncation policy; raise `RowReject` for rows that cannot be kept."""
    truncated = len(input_ids) > max_len
    if truncated:
        if truncation is Truncation.DROP:
            raise RowReject("too_long", f"{len(input_ids)} tokens > max_seq_length {max_len}")
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    result = Tokenized(input_ids, labels, truncated)
    if result.trainable == 0:
        reason = "no_trainable_tokens_after_truncation" if truncated else "no_trainable_tokens"
        raise RowReject(reason, f"{len(input_ids)} tokens, none trained")
    return result


def tokenize_rendered(tokenizer, texts: list[str], spans: list[list[Span]], max_len: int,
                      truncation: Truncation) -> list[Tokenized | RowReject]:
    """Tokenize a batch in one call to the Rust tokenizer; one result or reject per text."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    results: list[Tokenized | RowReject] = []
    for enc, row_spans in zip(encodings, spans, strict=True):
        input_ids, labels = build_labels(enc.ids, enc.char_to_token, row_spans)
        try:
            results.append(fit_length(input_ids, labels, max_len, truncation))
        except RowReject as e:
            results.append(e)
    return results
