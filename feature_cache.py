"""Stage 1's cached vision features: with the tower frozen, every image is encoded once (each rank a share), kept
fp16 in one memory-mapped file, and the dataset serves its rows instead of decoding images in every epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from data import Positioned, collate, collate_positioned, raise_problem
from distributed import Runtime, barrier, from_main, gathered
from model import VLM


class FeatureCache:
    """The frozen tower's downsampled features of every image, fp16 in one .npy file read through a memory map;
    rows offsets[i]:offsets[i + 1] belong to dataset position i. Workers open their own map."""

    def __init__(self, path: str, offsets: list[int]):
        self.path, self.offsets, self._array = path, offsets, None

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def features(self, position: int) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        rows = self._array[self.offsets[position]:self.offsets[position + 1]]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))


def attach_feature_cache(model: VLM, dataset, cache_dir: str, runtime: Runtime, batch_size: int, num_workers: int,
                         autocast) -> None:
    """Encode every image once with the frozen tower, each rank a contiguous share of the samples, unless a cache of
    the same tower and data is already there; then let the dataset serve features instead of decoding images.
    (Under torchrun the cache folder must be one filesystem for all ranks, like the checkpoints.)"""
    if any(p.requires_grad for p in model.vision_model.parameters()):
        raise ValueError("--cache_vision_features needs a frozen vision tower: its features must not change")
    offsets = [0, *itertools.accumulate(dataset.view_counts)]  # the start-up scan counted each sample's views
    path, meta_path = os.path.join(cache_dir, "features.npy"), os.path.join(cache_dir, "meta.json")
    decision = None
    if runtime.is_main:  # hashing the tower is not free: rank 0 decides and tells the others
        fingerprint = cache_fingerprint(model, dataset)
        reuse = os.path.exists(meta_path) and json.load(open(meta_path)).get("fingerprint") == fingerprint
        decision = fingerprint, reuse
    fingerprint, reuse = from_main(decision, runtime)
    if reuse:
        if runtime.is_main:
            print(f"using the cached vision features in {cache_dir}")
    else:
        shape = (offsets[-1], model.config.num_image_tokens, model.config.vision_config.hidden_size)
        temporary = path + ".tmp.npy"
        if runtime.is_main:
            os.makedirs(cache_dir, exist_ok=True)
            np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16, shape=shape).flush()
        barrier(runtime)
        share = math.ceil(len(dataset) / runtime.world_size)
        first = min(len(dataset), runtime.rank * share)
        positions = range(first, min(len(dataset), first + share))
        unusable = gathered(write_feature_cache(model, dataset, temporary, positions, offsets, runtime, batch_size,
                                                num_workers, autocast), runtime)
        images_per_rank = gathered([offsets[positions.stop] - offsets[positions.start]], runtime)
        if runtime.is_main:
            os.replace(temporary, path)
            with open(meta_path + ".tmp", "w") as f:
                json.dump({"fingerprint": fingerprint, "images": offsets[-1], "images_per_rank": images_per_rank,
                           "unusable": sorted(unusable)}, f)
            os.replace(meta_path + ".tmp", meta_path)
    barrier(runtime)
    dataset.unusable = set(json.load(open(meta_path))["unusable"])
    dataset.feature_cache = FeatureCache(path, offsets)


def cache_fingerprint(model: VLM, dataset) -> str:
    """What the cached features depend on: the tower's weights, the geometry, the data files and which of their
    samples are kept, in order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(json.dumps([model.config.num_image_tokens, model.config.vision_feature_layer, dataset.fingerprint(),
                              dataset.index]).encode())
    return digest.hexdigest()


def write_feature_cache(model: VLM, dataset, path: str, positions: range, offsets: list[int], runtime: Runtime,
                        batch_size: int, num_workers: int, autocast) -> list[int]:
    """Encode the images of dataset[positions] into their rows of the (preallocated) cache file; returns the
    positions whose images could not be used (skipped samples: their rows stay empty and they never train)."""
    array = np.load(path, mmap_mode="r+")
    encoded = []
    for batch_positions, features in encoded_images(model, dataset, positions, runtime, batch_size, num_workers,
                                                    autocast, "caching vision features"):
        encoded += batch_positions
        if features is not None:
            rows = [row for position in batch_positions for row in range(offsets[position], offsets[position + 1])]
            array[rows] = features.to(torch.float16).numpy()
    array.flush()
    del array
    return sorted(set(positions) - set(encoded))


def encoded_images(model: VLM, dataset, positions: range, runtime: Runtime, batch_size: int, num_workers: int,
                   autocast, description: str):
    """(positions, downsampled tower features on the CPU) for each batch of dataset[positions]; features is None
    for a batch without images."""
    loader = torch.utils.data.DataLoader(Positioned(dataset, positions), batch_size=batch_size,
                                         num_workers=num_workers, generator=torch.Generator(),
                                         collate_fn=partial(collate_positioned,
                                                            collate_fn=partial(collate, pad_token_id=0)))
    model.to(runtime.device).eval()
    with torch.no_grad(), autocast:
        for batch_positions, batch in tqdm(loader, desc=description, disable=not runtime.is_main):
            batch = raise_problem(batch)
            if batch is None or batch["pixel_values"] is None:
                yield batch_positions, None
                continue
            yield batch_positions, model.vision_features(batch["pixel_values"].to(runtime.device)).float().cpu()


def fit_projector_whitening(model: VLM, dataset, runtime: Runtime, batch_size: int, num_workers: int, autocast,
                            max_images: int = 2048) -> None:
    """--projector_input_norm whiten: fit the projector's input whitening on the first `max_images` training
    samples' features (the cache's rows when there is a cache; every rank reads the same ones, so all agree)."""
    positions = range(min(len(dataset), max_images))
    cache = getattr(dataset, "feature_cache", None)
    if cache is not None:
        usable = [p for p in positions if p not in dataset.unusable]
        features = [cache.features(p) for p in usable]
    else:
        features = [f for _, f in encoded_images(model, dataset, positions, runtime, batch_size, num_workers,
                                                 autocast, "fitting the projector's input whitening")
                    if f is not None]
    if not features:
        raise SystemExit("--projector_input_norm whiten: the first training samples have no images to fit it on")
    tokens = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    model.projector.norm.fit(tokens)
    if runtime.is_main:
        print(f"projector input whitening fitted on {tokens.shape[0]:,} feature tokens of the first training images")
