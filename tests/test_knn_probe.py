"""The weighted kNN probe (DINO's `knn_classifier`) on answers known in advance."""

import torch

from beit3.pretrain.knn_probe import knn_classify


def clustered(classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features near one random direction per class: any sane similarity separates them."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 10
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def test_separable_classes_are_all_found():
    bank, bank_labels = clustered(classes=37, per_class=20, dim=32, seed=1)
    queries, query_labels = clustered(classes=37, per_class=5, dim=32, seed=2)
    result = knn_classify(bank, bank_labels, queries, query_labels, 37)
    assert (result.top1, result.top5, result.queries, result.classes) == (1.0, 1.0, 185, 37)


def test_random_labels_score_about_chance():
    """10 classes: chance is 10% top-1 and 50% top-5; 4,000 queries put the standard error near 0.5%."""
    generator = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(5000, 64, generator=generator), torch.randn(4000, 64, generator=generator)
    bank_labels = torch.randint(0, 10, (5000,), generator=generator)
    query_labels = torch.randint(0, 10, (4000,), generator=generator)
    result = knn_classify(bank, bank_labels, queries, query_labels, 10)
    assert abs(result.top1 - 0.10) < 0.02
    assert abs(result.top5 - 0.50) < 0.03


def test_chunking_does_not_change_the_answer():
    generator = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(300, 16, generator=generator), torch.randn(180, 16, generator=generator)
    bank_labels, query_labels = torch.randint(0, 6, (300,), generator=generator), torch.randint(0, 6, (180,))
    whole = knn_classify(bank, bank_labels, queries, query_labels, 6, query_chunk=10_000, bank_chunk=10_000)
    chunked = knn_classify(bank, bank_labels, queries, query_labels, 6, query_chunk=7, bank_chunk=13)
    assert 0.0 < whole.top1 < 1.0
    assert whole == chunked


def test_votes_weigh_similarity_not_just_count():
    """Two near neighbours of class 0 outvote three far ones of class 1 (k = 5): DINO's exp(sim / T) weights."""
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [-0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    result = knn_classify(bank, labels, torch.tensor([[1.0, 0.3]]), torch.tensor([0]), 2, k=5)
    assert result.top1 == 1.0


def test_a_bank_smaller_than_k_and_a_single_class():
    result = knn_classify(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(2, 4),
                          torch.zeros(2, dtype=torch.long), 1, k=20)
    assert (result.top1, result.top5) == (1.0, 1.0)
