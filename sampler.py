"""The order of the batches: shuffled per epoch and rank, grouped by length when asked, able to start an epoch
part-way (a resumed run sees the same batches), and endless across epochs.
"""

from __future__ import annotations

import random

import torch

from distributed import Runtime
from data import raise_problem
from processor import DataError


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, so a resumed run sees the same batches.

    With `lengths`, each rank's shuffled order is cut into groups of `group_size` samples and each group sorted by
    length: a batch then holds samples of similar length and pads little (LLaVA's and the HF Trainer's
    group-by-length). The batches of a group are then shuffled, so a run does not sweep from its longest samples to
    its shortest (a short run spans few groups). Which samples meet in a group still changes every epoch."""

    def __init__(self, dataset, runtime: Runtime, seed: int, lengths: list[int] | None = None, group_size: int = 0,
                 batch_size: int = 1):
        super().__init__(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed)
        self.start, self.lengths, self.group_size, self.batch_size = 0, lengths, group_size, batch_size

    def __iter__(self):
        order = list(super().__iter__())
        if self.lengths is not None:
            shuffler = random.Random(f"{self.seed}-{self.epoch}")
            grouped = []
            for i in range(0, len(order), self.group_size):
                group = sorted(order[i:i + self.group_size], key=lambda index: -self.lengths[index])
                batches = [group[j:j + self.batch_size] for j in range(0, len(group), self.batch_size)]
                shuffler.shuffle(batches)
                grouped += [index for batch in batches for index in batch]
            order = grouped
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loader(dataset, sampler: ResumableSampler, collate_fn, batch_size: int, num_workers: int, seed: int,
                 runtime: Runtime):
    # The loader's own generator: starting an iterator draws a worker seed, which would otherwise come from the
    # global RNG and shift every dropout mask after a resume (which starts one iterator more than the whole run).
    # Persistent workers: a worker forked anew at each epoch shares the whole trained process copy-on-write, so every
    # page the training step writes is copied while it lives (on CPU, twice the memory from epoch 2 on), and each
    # fork stalls the step that waits for it.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                                       num_workers=num_workers, pin_memory=runtime.device.type == "cuda",
                                       persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed + runtime.rank))


class BatchStream:
    """Endless micro-batches across epochs; `epoch` and `batch_in_epoch` are the position a checkpoint stores."""

    def __init__(self, loader, sampler: ResumableSampler, batch_size: int, epoch: int = 0, batch_in_epoch: int = 0):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._iterator = None

    def next(self) -> dict:
        skipped = 0  # batches in a row whose every sample was skipped as unusable (collate gave None)
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.start = self.batch_in_epoch * self.batch_size
                self._iterator = iter(self.loader)
            try:
                batch = raise_problem(next(self._iterator))
                self.batch_in_epoch += 1
                if batch is not None:
                    return batch
                skipped += 1
                if skipped > len(self.loader):
                    raise DataError("not one usable sample in a whole epoch: every sample failed when its batch "
                                    "encoded it (see the 'skipping a bad sample' lines); raise --max_length or fix "
                                    "the data")
            except StopIteration:
                self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None
