"""Weighted k-NN probe: hand-computed votes, a float64 brute-force reference, ties, and the
multi-rank feature gather (same bank as one process)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mokd_scale.eval import knn
from mokd_scale.eval import linear_probe
from tests.dist_harness import run_on_ranks


def test_class_votes_are_sums_of_exp_similarity_over_temperature():
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[2, 0, 2]])
    votes = knn.class_votes(sims, labels, num_classes=4, temperature=0.1)
    expected = [math.exp(5.0), 0.0, math.exp(9.0) + math.exp(1.0), 0.0]
    assert votes[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_equal_votes_rank_the_lower_class_first():
    votes = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert knn.ranked_classes(votes)[0].tolist() == [1, 2, 4, 0, 3]


def hand_example():
    e1, e2, e3 = torch.eye(3)
    bank = torch.stack([e1, e1, e2, e3])
    bank_labels = torch.tensor([3, 1, 0, 2])
    queries = torch.stack([e1, e1, e2 + 0.5 * e3, e3])
    query_labels = torch.tensor([1, 3, 2, 6])
    return bank, bank_labels, queries, query_labels


def test_hand_computed_top1_top5():
    # k=2. q0, q1 = e1: the two e1 rows (classes 3 and 1) tie -> class 1 ranks first:
    #   q0 (label 1) top-1 hit; q1 (label 3) top-1 miss, top-5 hit.
    # q2 near e2: neighbours class 0 (sim .89) and class 2 (.45) -> label 2 top-5 only.
    # q3 = e3: class 2 first; label 6 has no vote and 0..4 fill the top five -> miss.
    bank, bank_labels, queries, query_labels = hand_example()
    result = knn.knn_accuracy(bank, bank_labels, queries, query_labels, k=2, temperature=0.07,
                              num_classes=8)
    assert result == {"top1": 25.0, "top5": 75.0}


def brute_force(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
    """Plain-Python float64 reference: rank neighbours by similarity, classes by vote, then id."""
    bank = F.normalize(bank.double(), dim=1)
    queries = F.normalize(queries.double(), dim=1)
    hits1 = hits5 = 0
    for query, label in zip(queries, query_labels.tolist()):
        sims = [float(query @ row) for row in bank]
        neighbours = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in neighbours:
            votes[int(bank_labels[j])] += math.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        hits1 += ranking[0] == label
        hits5 += label in ranking[:5]
    n = len(query_labels)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


@pytest.mark.parametrize("k", [1, 20])
def test_matches_float64_brute_force(k):
    generator = torch.Generator().manual_seed(k)
    centres = torch.randn(10, 16, generator=generator)
    bank_labels = torch.randint(0, 10, (300,), generator=generator)
    query_labels = torch.randint(0, 10, (80,), generator=generator)
    bank = centres[bank_labels] + 1.5 * torch.randn(300, 16, generator=generator)
    queries = centres[query_labels] + 1.5 * torch.randn(80, 16, generator=generator)
    expected = brute_force(bank, bank_labels, queries, query_labels, k, 0.07, 10)
    got = knn.knn_accuracy(bank, bank_labels, queries, query_labels, k=k, temperature=0.07)
    assert got == pytest.approx(expected)
    assert 10.0 < got["top1"] < 100.0 and got["top1"] < got["top5"]  # a non-trivial case


def test_chunking_does_not_change_hits():
    generator = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    queries = F.normalize(torch.randn(23, 8, generator=generator), dim=1)
    bank_labels = torch.randint(0, 7, (50,), generator=generator)
    query_labels = torch.randint(0, 7, (23,), generator=generator)
    whole = knn.knn_hits(bank, bank_labels, queries, query_labels, 7, k=5, chunk_size=1000)
    chunked = knn.knn_hits(bank, bank_labels, queries, query_labels, 7, k=5, chunk_size=4)
    assert whole == chunked


def test_empty_bank_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty memory bank"):
        knn.knn_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                         torch.ones(2, 4), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- gather across ranks
NUM_SAMPLES = 11


def toy_dataset():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(NUM_SAMPLES, 3, 4, 4, generator=generator)
    labels = torch.arange(NUM_SAMPLES) % 3
    return images, labels


def toy_models():
    torch.manual_seed(0)
    return {"a": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)),
            "b": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 7))}


def toy_loader(sample_ids, batch_size=3):
    images, labels = toy_dataset()
    for start in range(0, len(sample_ids), batch_size):
        ids = torch.tensor(sample_ids[start:start + batch_size])
        yield {"image": images[ids], "label": labels[ids], "index": ids}


def gather_on_rank(rank, world_size, with_duplicate):
    ids = list(range(NUM_SAMPLES))[rank::world_size]  # uneven: 6 and 5 samples
    if with_duplicate and rank == 1:
        ids.append(0)  # rank 0 also holds sample 0: it must be kept once
    feats, labels, indices = knn.collect_features(toy_models(), toy_loader(ids), torch.device("cpu"),
                                                  world_size)
    accuracy = knn.knn_accuracy(feats["a"], labels, feats["b"][:, :5], labels, k=3,
                                rank=rank, world_size=world_size)
    # numpy, not tensors: torch's queue passes tensors through shared memory that vanishes
    # when the rank process exits (racy FileNotFoundError in the parent).
    return {k: v.numpy() for k, v in feats.items()}, labels.numpy(), indices.numpy(), accuracy


def both_cases_on_rank(rank, world_size):
    return [gather_on_rank(rank, world_size, with_duplicate) for with_duplicate in (False, True)]


@pytest.mark.integration
def test_two_rank_gather_equals_one_process():
    """Uneven ranks, and a sample held by both ranks: same bank and accuracy as one process."""
    shuffled = [7, 2, 10, 0, 5, 3, 9, 1, 4, 8, 6]  # order must not matter after the sort
    one_feats, one_labels, one_indices = knn.collect_features(toy_models(), toy_loader(shuffled),
                                                              torch.device("cpu"), 1)
    one_accuracy = knn.knn_accuracy(one_feats["a"], one_labels, one_feats["b"][:, :5], one_labels, k=3)
    for feats, labels, indices, accuracy in run_on_ranks(both_cases_on_rank, 2, timeout=90):
        assert indices.tolist() == list(range(NUM_SAMPLES)) == one_indices.tolist()
        assert torch.equal(torch.from_numpy(labels), one_labels)
        for name in ("a", "b"):
            torch.testing.assert_close(torch.from_numpy(feats[name]), one_feats[name])
            assert torch.allclose(one_feats[name].norm(dim=1), torch.ones(NUM_SAMPLES))
        assert accuracy == one_accuracy


# ------------------------------------------------------------ linear probe
def test_linear_probe_learns_separable_features_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centres = 3 * torch.randn(4, 32, generator=generator)
    features = centres[labels] + torch.randn(400, 32, generator=generator) + 50.0  # offset: needs standardising
    classifier, mean, std = linear_probe.train_linear(features[:300], labels[:300], 4, epochs=8, lr=0.1,
                                                     batch_size=64, weight_decay=0.0, seed=0)
    assert linear_probe.top1(classifier, mean, std, features[300:], labels[300:]) > 95.0
    noise = torch.randn(400, 32, generator=generator)
    classifier, mean, std = linear_probe.train_linear(noise[:300], labels[:300], 4, 8, 0.1, 64, 0.0, 0)
    assert linear_probe.top1(classifier, mean, std, noise[300:], labels[300:]) < 50.0


def test_linear_probe_vit_features_are_the_last_four_normed_class_tokens():
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=5, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = linear_probe.LinearProbeFeatures(vit, is_vit=True)(images)
        tokens = vit.patch_embed(images)
        tokens = vit.norm_pre(vit._pos_embed(tokens))
        class_tokens = []
        for block in vit.blocks:
            tokens = block(tokens)
            class_tokens.append(vit.norm(tokens)[:, 0])
    assert got.shape == (2, 4 * 32)
    torch.testing.assert_close(got, torch.cat(class_tokens[-4:], dim=1))
    torch.testing.assert_close(got[:, -32:], vit(images))  # the last one is the pooled output
