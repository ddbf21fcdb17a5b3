"""Weighted k-NN probe of frozen backbones (the standard self-supervised check).

Each query votes with its k most cosine-similar memory-bank samples; neighbour j adds
exp(sim_j / T) to the score of its class. Top-1/top-5 are read from the ranked scores.

Features are extracted on every rank from the eval loader (each sample seen by one rank),
then gathered so that every rank holds the whole bank; the queries are then split across
ranks and only the hit counts are summed, so the result is the same on every rank and
does not depend on the world size.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mokd_scale.runtime import dist

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


# ----------------------------------------------------------------------------- scoring
def class_votes(similarities: torch.Tensor, neighbour_labels: torch.Tensor,
                num_classes: int, temperature: float) -> torch.Tensor:
    """(q, k) similarities of the chosen neighbours + their labels -> (q, C) vote totals."""
    weights = torch.exp(similarities.double() / temperature)
    votes = torch.zeros(similarities.shape[0], num_classes, dtype=torch.float64,
                        device=similarities.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


def ranked_classes(votes: torch.Tensor) -> torch.Tensor:
    """Classes by decreasing vote; equal votes rank the lower class id first (deterministic)."""
    return torch.sort(votes, dim=1, descending=True, stable=True).indices


def knn_hits(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
             query_labels: torch.Tensor, num_classes: int, k: int = DEFAULT_K,
             temperature: float = DEFAULT_TEMPERATURE, chunk_size: int = 1024) -> tuple[int, int]:
    """Number of queries whose label is ranked first / within the first five.

    `bank` and `queries` must already be L2-normalised (rows). Queries are processed in
    chunks so the (chunk, bank) similarity matrix stays bounded.
    """
    k = min(k, bank.shape[0])
    top_n = min(5, num_classes)
    hits1 = hits5 = 0
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size]
        labels = query_labels[start:start + chunk_size].to(q.device)
        similarity = q @ bank.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = class_votes(top_sim.float(), bank_labels[top_idx], num_classes, temperature)
        ranking = ranked_classes(votes)[:, :top_n]
        correct = ranking == labels[:, None]
        hits1 += int(correct[:, 0].sum())
        hits5 += int(correct.any(dim=1).sum())
    return hits1, hits5


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                 rank: int = 0, world_size: int = 1, normalized: bool = False) -> dict[str, float]:
    """Top-1/top-5 (percent). Features are L2-normalised here unless `normalized` says they
    already are (saves a bank-sized copy). With world_size > 1 every rank passes the same full
    bank/queries; each scores a strided slice and the counts are summed.
    """
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError(f"k-NN needs a non-empty memory bank and query set "
                         f"(got {bank.shape[0]} bank, {queries.shape[0]} query samples): "
                         "check the train/val shard paths")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    if not normalized:
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    queries = queries.to(bank.dtype)
    mine = slice(rank, None, world_size)
    hits1, hits5 = knn_hits(bank, bank_labels.to(bank.device), queries[mine], query_labels[mine],
                            num_classes, k, temperature)
    counts = torch.tensor([hits1, hits5], dtype=torch.float64, device=bank.device)
    if world_size > 1:
        counts = dist.all_reduce_sum(counts)
    total = queries.shape[0]
    return {"top1": 100.0 * float(counts[0]) / total, "top5": 100.0 * float(counts[1]) / total}


# ------------------------------------------------------------------ feature extraction
def pooled_feature_model(network: nn.Module) -> nn.Module:
    """The timm backbone inside a MokdNetwork (pooled output = what export gives), or the
    module itself when a bare backbone is passed."""
    backbone = getattr(network, "backbone", None)
    return getattr(backbone, "model", backbone) if backbone is not None else network


def _autocast(device: torch.device):
    # GPUs extract in bf16 (ViT-L over ImageNet); CPUs without native bf16 stay fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_local_features(models: dict[str, nn.Module], loader, device: torch.device,
                           max_samples: int = 0, normalize: bool = True,
                           storage_dtype: torch.dtype = torch.float32
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Run every model on this rank's eval batches (images loaded once for all models).

    Returns ({name: (n, d) features in storage_dtype, L2-normalised unless normalize=False},
    labels (n,), sample indices (n,)).
    """
    features: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels, indices, seen = [], [], 0
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with _autocast(device):
            for name, model in models.items():
                output = model(images).float()
                output = F.normalize(output, dim=1) if normalize else output
                features[name].append(output.to(storage_dtype))
        labels.append(batch["label"].to(device))
        indices.append(batch["index"].to(device))
        seen += images.shape[0]
        if max_samples and seen >= max_samples:
            break
    if max_samples and seen > max_samples:  # the cap is exact, not rounded up to a batch
        features = {name: [torch.cat(f)[:max_samples]] for name, f in features.items()}
        labels, indices = [torch.cat(labels)[:max_samples]], [torch.cat(indices)[:max_samples]]
    if not labels:  # this rank got no sample; it still joins the gathers with 0 rows
        empty = {name: torch.zeros(0, feature_width(m), device=device, dtype=storage_dtype)
                 for name, m in models.items()}
        no_ids = torch.zeros(0, dtype=torch.long, device=device)
        return empty, no_ids, no_ids.clone()
    return ({name: torch.cat(f) for name, f in features.items()},
            torch.cat(labels).long(), torch.cat(indices).long())


def gather_features(features: dict[str, torch.Tensor], labels: torch.Tensor,
                    indices: torch.Tensor, world_size: int
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gather every rank's features, then sort by sample index and keep each index once.

    Sorting makes the bank identical for any world size; dropping repeats guards against a
    loader that hands a sample to two ranks (it would otherwise vote twice).
    """
    if world_size > 1:  # ranks may hold different numbers of samples; all_gather_cat pads
        labels, indices = dist.all_gather_cat(labels), dist.all_gather_cat(indices)
        features = {name: dist.all_gather_cat(f) for name, f in features.items()}
    order = torch.argsort(indices, stable=True)
    indices, labels = indices[order], labels[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return ({name: f[order][first] for name, f in features.items()}, labels[first], indices[first])


def feature_width(model: nn.Module) -> int:
    """Width of a timm backbone's pooled output (num_classes=0)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def collect_features(models: dict[str, nn.Module], loader, device: torch.device,
                     world_size: int, max_samples: int = 0, normalize: bool = True,
                     storage_dtype: torch.dtype = torch.float32):
    """Extract on this rank, gather across ranks; features sorted by global sample index.

    max_samples caps the work: each rank stops after its share (so which samples are used
    then depends on the world size)."""
    per_rank_cap = -(-max_samples // world_size) if max_samples else 0
    feats, labels, indices = extract_local_features(models, loader, device, per_rank_cap, normalize,
                                                    storage_dtype)
    return gather_features(feats, labels, indices, world_size)


# ------------------------------------------------------------------------ entry point
def _knn_shards(data_cfg) -> tuple[str, str]:
    bank = getattr(data_cfg, "knn_train_shards", "") or data_cfg.train_shards
    if not bank or not data_cfg.val_shards:
        raise ValueError("the k-NN probe needs labelled shards: set data.val_shards and data.train_shards "
                         "(or data.knn_train_shards), or train.knn_every=0 (e.g. with synthetic data)")
    return bank, data_cfg.val_shards


@torch.no_grad()
def evaluate_knn(networks: dict[str, nn.Module], cfg, rank: int, world_size: int,
                 device: torch.device) -> dict[str, dict[str, float]]:
    """k-NN top-1/top-5 of each network's pooled backbone features; same result on all ranks.

    Collective: every rank must call it. Models are put in eval mode and restored afterwards.
    """
    from mokd_scale.data import build_eval_loader  # data pipeline is only needed here

    models = {name: pooled_feature_model(net) for name, net in networks.items()}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        bank_shards, val_shards = _knn_shards(cfg.data)
        batch_size = cfg.eval.batch_size
        # Unit vectors lose nothing that matters in fp16, and an ImageNet bank of 2048-wide
        # features (1.28 M x 2048) then takes 5 GB per GPU instead of 10.
        bank_dtype = torch.float16 if device.type == "cuda" else torch.float32

        def features_of(shards, max_samples):
            loader = build_eval_loader(shards, cfg.data, batch_size, rank, world_size)
            return collect_features(models, loader, device, world_size, max_samples, True, bank_dtype)

        bank, bank_labels, _ = features_of(bank_shards, cfg.eval.max_train_samples)
        queries, query_labels, _ = features_of(val_shards, cfg.eval.max_val_samples)
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
        return {name: knn_accuracy(bank[name], bank_labels, queries[name],
                                   query_labels, cfg.eval.knn_k, cfg.eval.knn_temperature,
                                   num_classes, rank, world_size, normalized=True)
                for name in models}
    finally:
        for name, m in models.items():
            m.train(was_training[name])
