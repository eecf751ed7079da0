"""How fast is the shared core? Everything is measured side by side in this one run.

1. A large fp32 matrix multiply: this machine's practical roofline.
2. One epoch of the seed tutorial's own loop (DataLoader + ToTensor over PIL images).
3. One epoch of `optimsweep.train.train_epoch` on the same model, data and batch size.
4. The core at batch 256, as a fraction of the roofline (the tutorial MLP costs about
   4.0 MFLOP per training sample: 3 x 1.34 MFLOP for forward + backward).

Usage: python benchmarks/bench_core.py [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from optimsweep.data import _split, default_data_root, load_fashion_mnist, prepare_fashion_mnist
from optimsweep.models import NeuralNetwork
from optimsweep.train import evaluate, train_epoch

FLOP_PER_SAMPLE = 4.0e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_roofline(device: torch.device, n: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def tutorial_epoch(device, batch_size: int, train_idx, val_idx) -> tuple[float, float]:
    """The seed tutorial's train_loop and test_loop, verbatim apart from the device move.

    Returns (train seconds, train + evaluation seconds); the evaluation pass covers the same
    10k validation images the core evaluates each epoch.
    """
    from torchvision.datasets import FashionMNIST
    from torchvision.transforms import ToTensor

    images = FashionMNIST(str(default_data_root()), train=True, transform=ToTensor())
    train_loader = DataLoader(Subset(images, train_idx.tolist()), batch_size=batch_size,
                              shuffle=True)
    eval_loader = DataLoader(Subset(images, val_idx.tolist()), batch_size=batch_size)
    torch.manual_seed(0)
    model = NeuralNetwork().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for batch, (X, y) in enumerate(train_loader):
        X, y = X.to(device), y.to(device)
        loss = loss_fn(model(X), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if batch % 100 == 0:
            loss.item()  # the tutorial prints here
    sync(device)
    trained = time.perf_counter()
    model.eval()
    test_loss, correct = 0.0, 0.0
    with torch.no_grad():
        for X, y in eval_loader:
            X, y = X.to(device), y.to(device)
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    return trained - start, time.perf_counter() - start


def core_epoch(data, device: torch.device, batch_size: int, repeats: int) -> tuple[float, float]:
    """Best of `repeats` epochs of what `fit` does: (train seconds, train + evaluation)."""
    torch.manual_seed(0)
    model = NeuralNetwork().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    best_train = best_total = float("inf")
    for epoch in range(repeats + 1):  # the first epoch warms up allocators and caches
        sync(device)
        start = time.perf_counter()
        train_epoch(model, loss_fn, optimizer, data.train_x, data.train_y, batch_size,
                    generator, epoch)
        sync(device)
        trained = time.perf_counter()
        evaluate(model, loss_fn, data.val_x, data.val_y)
        if epoch:
            best_train = min(best_train, trained - start)
            best_total = min(best_total, time.perf_counter() - start)
    return best_train, best_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    prepare_fashion_mnist()
    data = load_fashion_mnist(device=device)
    n = len(data.train_y)
    # the same 50k training and 10k validation images the core uses
    train_idx, val_idx = _split(60_000, len(data.val_y), data.split_seed)
    print(f"device: {device}  threads: {torch.get_num_threads()}  torch {torch.__version__}  "
          f"train images: {n}")

    roof = max(matmul_roofline(device, n) for n in (2048, 4096))
    print(f"matmul roofline (best of 2048^2, 4096^2 fp32): {roof / 1e9:.1f} GFLOP/s\n")

    tutorial = tutorial_epoch(device, 64, train_idx, val_idx)
    core64 = core_epoch(data, device, 64, args.repeats)
    core256 = core_epoch(data, device, 256, args.repeats)
    print(f"{'seconds per epoch':34s} {'train':>8s} {'train+eval':>11s}")
    for name, (train_s, total_s) in (("tutorial DataLoader loop, batch 64", tutorial),
                                     ("optimsweep core, batch 64", core64),
                                     ("optimsweep core, batch 256", core256)):
        print(f"{name:34s} {train_s:8.2f} {total_s:11.2f}")
    print(f"\nspeed-up over the tutorial at batch 64: train {tutorial[0] / core64[0]:.2f}x, "
          f"train+eval {tutorial[1] / core64[1]:.2f}x")
    for name, seconds in (("batch 64", core64[0]), ("batch 256", core256[0])):
        rate = n * FLOP_PER_SAMPLE / seconds
        print(f"core training at {name}: {rate / 1e9:.1f} GFLOP/s = {rate / roof:.1%} of roofline")


if __name__ == "__main__":
    main()
