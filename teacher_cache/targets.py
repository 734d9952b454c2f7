"""What the teacher contributes per (sample, aug seed), exactly as stored in the cache.

`encode_teacher_logits` is the one place where teacher logits become targets: stage one
stores its output, and stage two's online teacher passes its live logits through it too,
so a cached run and an online run see identical numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherTargets:
    topk_indices: torch.Tensor            # (N, K) int64, descending by teacher score
    topk_logprobs: torch.Tensor           # (N, K) float32 (values representable in fp16)
    logits: torch.Tensor | None = None    # (N, C) float32 (values representable in fp16), full mode only

    @property
    def label(self) -> torch.Tensor:
        """The teacher's hard label (argmax of its fp32 logits)."""
        return self.topk_indices[:, 0]

    def __len__(self) -> int:
        return self.topk_indices.shape[0]

    def select(self, index) -> "TeacherTargets":
        return TeacherTargets(self.topk_indices[index], self.topk_logprobs[index],
                              None if self.logits is None else self.logits[index])

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.topk_indices.to(device), self.topk_logprobs.to(device),
                              None if self.logits is None else self.logits.to(device))

    @staticmethod
    def cat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        logits = None if parts[0].logits is None else torch.cat([p.logits for p in parts])
        return TeacherTargets(torch.cat([p.topk_indices for p in parts]),
                              torch.cat([p.topk_logprobs for p in parts]), logits)


def encode_teacher_logits(logits: torch.Tensor, topk: int, store_full: bool = False) -> TeacherTargets:
    """fp32 teacher logits (N, C) -> top-k indices + fp16-rounded top-k log-probs (+ full fp16 logits)."""
    logits = logits.detach().float()
    if not 1 <= topk <= logits.shape[1]:
        raise ValueError(f"top-k K={topk} must be between 1 and the number of classes {logits.shape[1]}")
    logprobs = torch.log_softmax(logits, dim=1)
    values, indices = torch.topk(logprobs, topk, dim=1, largest=True, sorted=True)
    full = logits.half().float() if store_full else None
    return TeacherTargets(indices.long(), values.half().float(), full)
