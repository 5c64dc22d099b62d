"""Train a small classifier for one epoch on reef-points, straight from the WebDataset shards.

    pip install -r requirements-examples.txt
    dvc pull data/release/reef-points          # or: dvc get <repo> data/release/reef-points --rev vX.Y.Z
    python examples/train_reef_points.py --release data/release/reef-points

Nothing of the tidepool code is used: the shards are read with `webdataset`, batched by a torch
DataLoader, and the class map comes from `classes.json` beside them. The shard list of each split
is the wids index (`<split>.index.json`), so no brace pattern has to be kept in sync with it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader


def shard_urls(release: Path, split: str) -> list[str]:
    """The split's shards, from its wids index (urls are relative to the index)."""
    index = json.loads((release / f"{split}.index.json").read_text())
    return [str(release / entry["url"]) for entry in index["shardlist"]]


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB patch -> float CHW in [0, 1], resized to size x size (a 224 px patch is more than a toy needs)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def loader(urls: list[str], size: int, batch_size: int, workers: int, shuffle: bool) -> DataLoader:
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, empty_check=False)
        .shuffle(1000 if shuffle else 0)
        .decode("pil")
        .to_tuple("webp;png;jpg", "cls")
        .map_tuple(lambda img: to_tensor(img, size), int)
        .batched(batch_size, partial=True)
    )
    # webdataset batches itself; the DataLoader parallelises decoding across workers.
    return DataLoader(dataset, batch_size=None, num_workers=workers)


class SmallNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, default=Path("data/release/reef-points"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=None, help="stop an epoch early (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    classes = json.loads((args.release / "classes.json").read_text())
    num_classes = int(classes["num_classes"])
    train = loader(shard_urls(args.release, "train"), args.image_size, args.batch_size, args.workers, True)
    val = loader(shard_urls(args.release, "val"), args.image_size, args.batch_size, args.workers, False)

    model = SmallNet(num_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        started, seen, total_loss = time.monotonic(), 0, 0.0
        for step, (images, labels) in enumerate(train):
            if args.max_batches is not None and step >= args.max_batches:
                break
            optimiser.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimiser.step()
            seen += len(labels)
            total_loss += loss.item() * len(labels)
        model.eval()
        correct = evaluated = 0
        with torch.no_grad():
            for step, (images, labels) in enumerate(val):
                if args.max_batches is not None and step >= args.max_batches:
                    break
                correct += int((model(images).argmax(1) == labels).sum())
                evaluated += len(labels)
        print(
            f"epoch {epoch + 1}: {seen} training samples, mean loss {total_loss / max(seen, 1):.4f}, "
            f"val accuracy {correct / max(evaluated, 1):.3f} on {evaluated} samples, "
            f"{time.monotonic() - started:.1f}s"
        )


if __name__ == "__main__":
    main()
