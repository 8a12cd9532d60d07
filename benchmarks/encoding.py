"""(b) Encoding: images/s of ``privenc.attackers.encode_task`` (the frozen encoder over a task's
pools, read from the uint8 cache) against a naive loop that decodes every JPEG with PIL and
runs the same encoder, eager float32."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from privenc.attackers import encode_task
from privenc.config import Config
from privenc.data import TaskData
from privenc.data.transforms import eval_transform, train_transform

from fixtures import JpegDataset, frozen_encoder
from measure import Row, compare, interleave

SPLITS = ("train", "val", "test")


def encoding(label: str, config: Config, data: TaskData, jpegs: dict[str, list[Path]], repeats: int) -> list[Row]:
    """One pass over the train (one augmented view), val and test pools per timed unit."""
    encoder = frozen_encoder(config)
    batch = config.verify.batch_size
    count = sum(len(data.indices[s]) for s in SPLITS)
    # encode_task encodes for the first task (its labels); keep that one
    single = replace(data, tasks=data.tasks[:1], labels={s: v[:, :1] for s, v in data.labels.items()})

    def library() -> int:
        encode_task(encoder, single, views=1, batch_size=batch, device=torch.device("cpu"))
        return count

    loaders = [DataLoader(JpegDataset(jpegs[s], data.labels[s][:, :1], config.data.load_size,
                                      train_transform(config.data) if s == "train" else eval_transform(config.data)),
                          batch_size=batch) for s in SPLITS]

    @torch.no_grad()
    def naive() -> int:
        for loader in loaders:
            for images, _ in loader:
                encoder(images)
        return count

    rates = interleave({"naive: PIL decode per item, eager fp32": naive,
                        "privenc: encode_task from the uint8 cache": library}, repeats)
    return compare(f"(b) encoding, {label}", rates, "naive: PIL decode per item, eager fp32", "images/s")
