"""The weighted k-nearest-neighbour probe of DINO (`eval_knn.py`, `knn_classifier`).

Each query feature votes with its k most cosine-similar bank features; a neighbour's vote for its class weighs
exp(similarity / temperature) (DINO: k = 20, T = 0.07). Top-1 and top-5 count the queries whose class is the
first, or among the first five, of the summed votes. Unlike DINO, which holds the whole query-by-bank
similarity matrix of a chunk of queries, the bank is also walked in chunks and a running top-k kept, so memory
is bounded by the chunk sizes whatever the bank's size.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KnnResult:
    top1: float
    """Share of queries whose highest-voted class is theirs (0 to 1)."""
    top5: float
    """Share of queries whose class is among the five highest-voted (all of them when there are 5 classes or
    fewer)."""
    queries: int
    classes: int


def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 classes: int, k: int = 20, temperature: float = 0.07, query_chunk: int = 256,
                 bank_chunk: int = 8192) -> KnnResult:
    """Weighted kNN accuracy of `queries` ([Q, d]) against `bank` ([B, d]); labels are class indices below
    `classes`. Features are L2-normalised here, so any scale works."""
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("the kNN probe needs at least one bank feature and one query")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    top1 = top5 = 0
    for first in range(0, queries.shape[0], query_chunk):
        chunk = F.normalize(queries[first : first + query_chunk].float(), dim=1)
        similarity, neighbours = _top_k(chunk, bank, k, bank_chunk)
        votes = torch.zeros(chunk.shape[0], classes)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True, stable=True)
        correct = ranked == query_labels[first : first + query_chunk, None]
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, : min(5, classes)].sum())
    return KnnResult(top1 / queries.shape[0], top5 / queries.shape[0], queries.shape[0], classes)


def _top_k(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest cosine similarities of each query over the bank and their bank indices, merged chunk by
    chunk of the bank."""
    best = torch.full((queries.shape[0], 0), -float("inf"))
    where = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for first in range(0, bank.shape[0], bank_chunk):
        similarity = queries @ bank[first : first + bank_chunk].T
        indices = torch.arange(first, first + similarity.shape[1]).expand_as(similarity)
        best, picked = torch.cat([best, similarity], dim=1).topk(min(k, best.shape[1] + similarity.shape[1]), dim=1)
        where = torch.cat([where, indices], dim=1).gather(1, picked)
    return best, where
