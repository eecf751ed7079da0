"""How fast is the shared core? Everything is measured side by side in this one run.

1. A large fp32 matrix multiply: this machine's practical roofline.
2. One epoch of the seed tutorial's own loop (DataLoader + ToTensor over PIL images).
3. One epoch of the core's training loop (`core_loops.train_epoch`) on the same model, data
   and batch size.
4. The core at batch 256, as a fraction of the roofline (the tutorial MLP costs about
   4.0 MFLOP per training sample: 3 x 1.34 MFLOP for forward + backward).
5. The matmul floor at batch 64: only the eight matrix multiplies of each training step (same
   shapes and layouts, nothing else), so the speed-up that any fp32 implementation of the
   core could reach over the tutorial on this machine is measured too.

The loops run interleaved in rounds (tutorial, core 64, matmul floor 64, core 256, roofline)
and ratios are taken within each round: this machine's speed drifts by up to 1.7x over
minutes, and a slow phase then hits both sides of a ratio. Medians over rounds are printed;
with --results DIR, written to DIR/bench_core.md too, with the date, commit and CPU
(`make bench-core`: docs/results).

Usage: python benchmarks/bench_core.py [--device cpu|cuda] [--rounds 3] [--train-images N]
       [--roofline-sizes 2048,4096] [--results DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import results
from core_loops import evaluate, load_fashion_mnist, train_epoch
from optimsweep.core.data import _split, default_data_root, prepare_fashion_mnist
from optimsweep.core.models import NeuralNetwork

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


class TutorialLoop:
    """The seed tutorial's train_loop and test_loop, verbatim apart from the device move."""

    def __init__(self, device, batch_size: int, train_idx, val_idx):
        from torchvision.datasets import FashionMNIST
        from torchvision.transforms import ToTensor

        images = FashionMNIST(str(default_data_root()), train=True, transform=ToTensor())
        self.train_loader = DataLoader(Subset(images, train_idx.tolist()),
                                       batch_size=batch_size, shuffle=True)
        self.eval_loader = DataLoader(Subset(images, val_idx.tolist()), batch_size=batch_size)
        torch.manual_seed(0)
        self.device = device
        self.model = NeuralNetwork().to(device)
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)

    def epoch(self) -> tuple[float, float]:
        """(train seconds, train + evaluation seconds); the evaluation covers the same 10k
        validation images the core evaluates each epoch."""
        return tutorial_epoch(self.device, self.model, self.loss_fn, self.optimizer,
                              self.train_loader, self.eval_loader)


def tutorial_epoch(device, model, loss_fn, optimizer, train_loader, eval_loader):
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


class CoreLoop:
    """What `fit` does each epoch: train_epoch, then evaluate on the validation split."""

    def __init__(self, data, device, batch_size: int):
        torch.manual_seed(0)
        self.data, self.device, self.batch_size = data, device, batch_size
        self.model = NeuralNetwork().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.loss_fn = nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(0)
        self.epoch()  # warm-up: allocator and caches

    def epoch(self) -> tuple[float, float]:
        d = self.data
        sync(self.device)
        start = time.perf_counter()
        train_epoch(self.model, self.loss_fn, self.optimizer, d.train_x, d.train_y,
                    self.batch_size, self.generator, 1)
        sync(self.device)
        trained = time.perf_counter()
        evaluate(self.model, self.loss_fn, d.val_x, d.val_y)
        sync(self.device)
        return trained - start, time.perf_counter() - start


class MatmulFloor:
    """The eight GEMMs one training step of the tutorial MLP cannot avoid: three forward,
    and in backward the weight gradients of all three layers plus the input gradients of
    layers 2 and 3 (the images need none). No activations, loss, autograd or optimizer."""

    def __init__(self, device, batch_size: int, n: int):
        self.n, self.batch_size = n, batch_size
        w = [layer.weight.detach() for layer in NeuralNetwork().to(device).linear_relu_stack
             if isinstance(layer, nn.Linear)]
        b = [torch.zeros(weight.shape[0], device=device) for weight in w]
        self.w, self.b, self.device = w, b, device
        self.x = torch.rand(batch_size, w[0].shape[1], device=device)
        self.epoch()

    def epoch(self) -> float:
        (w1, w2, w3), (b1, b2, b3), x = self.w, self.b, self.x
        sync(self.device)
        start = time.perf_counter()
        for _ in range(math.ceil(self.n / self.batch_size)):
            h1 = torch.addmm(b1, x, w1.t())
            h2 = torch.addmm(b2, h1, w2.t())
            g3 = torch.addmm(b3, h2, w3.t())
            torch.mm(g3.t(), h2)
            g2 = torch.mm(g3, w3)
            torch.mm(g2.t(), h1)
            g1 = torch.mm(g2, w2)
            torch.mm(g1.t(), x)
        sync(self.device)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=None,
                        help="time epochs over the first N training images only (a quick check)")
    parser.add_argument("--roofline-sizes", default="2048,4096",
                        help="square matrix sizes whose best multiply is the roofline (a quick "
                             "check can skip 4096, which takes most of a round on a CPU)")
    results.option(parser)
    args = parser.parse_args()
    out = results.Results(args.results, __file__, "bench-core")
    roofline_sizes = [int(size) for size in args.roofline_sizes.split(",")]
    device = torch.device(args.device)
    prepare_fashion_mnist()
    data = load_fashion_mnist(device=device, train_subset=args.train_images)
    n = len(data.train_y)
    # the same 50k training and 10k validation images the core uses
    train_idx, val_idx = _split(60_000, len(data.val_y), data.split_seed)
    train_idx = train_idx[:n]
    print(f"device: {device}  threads: {torch.get_num_threads()}  torch {torch.__version__}  "
          f"train images: {n}")

    tutorial = TutorialLoop(device, 64, train_idx, val_idx)
    core64, core256 = CoreLoop(data, device, 64), CoreLoop(data, device, 256)
    floor64 = MatmulFloor(device, 64, n)
    rows = []
    print(f"{'round':>5} {'tutorial 64':>12} {'core 64':>9} {'floor 64':>9} {'core 256':>9}"
          f" {'roofline':>10} {'speed-up 64':>12} {'(+eval)':>8} {'ceiling 64':>11}"
          f" {'core 256 / roof':>16}")
    for r in range(1, args.rounds + 1):
        t, c64, f64, c256 = tutorial.epoch(), core64.epoch(), floor64.epoch(), core256.epoch()
        roof = max(matmul_roofline(device, size) for size in roofline_sizes)
        row = {"tutorial": t[0], "core64": c64[0], "floor64": f64, "core256": c256[0],
               "roof": roof, "speedup": t[0] / c64[0], "speedup_eval": t[1] / c64[1],
               "ceiling": t[0] / f64, "core_over_floor": c64[0] / f64,
               "share256": n * FLOP_PER_SAMPLE / c256[0] / roof,
               "share64": n * FLOP_PER_SAMPLE / c64[0] / roof}
        rows.append(row)
        print(f"{r:>5} {t[0]:11.2f}s {c64[0]:8.2f}s {f64:8.2f}s {c256[0]:8.2f}s"
              f" {roof / 1e9:6.1f} GF/s {row['speedup']:11.2f}x {row['speedup_eval']:7.2f}x"
              f" {row['ceiling']:10.2f}x {row['share256']:16.1%}")

    def med(key):
        return statistics.median(row[key] for row in rows)

    print(f"\nmedian over {len(rows)} rounds (seconds per epoch of {n} images, training only):")
    print(f"  tutorial DataLoader loop, batch 64:  {med('tutorial'):.2f} s")
    print(f"  optimsweep core, batch 64:           {med('core64'):.2f} s  "
          f"({med('share64'):.1%} of roofline)")
    print(f"  its eight matmuls alone, batch 64:   {med('floor64'):.2f} s  "
          f"(the core takes {med('core_over_floor'):.2f}x that)")
    print(f"  optimsweep core, batch 256:          {med('core256'):.2f} s")
    print(f"speed-up over the tutorial at batch 64: {med('speedup'):.2f}x "
          f"(with each epoch's evaluation pass: {med('speedup_eval'):.2f}x); "
          f"matmuls alone would give {med('ceiling'):.2f}x")
    print(f"core at batch 256, share of the matmul roofline ({med('roof') / 1e9:.0f} GFLOP/s at "
          f"{FLOP_PER_SAMPLE / 1e6:.1f} MFLOP/sample): {med('share256'):.1%}")
    images = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    out.write([
        results.Table([f"per epoch, {images} images", "seconds"], [
            ["tutorial loop, batch 64", f"{med('tutorial'):.2f}"],
            ["optimsweep core, batch 64", f"{med('core64'):.2f}"],
            ["the same step's 8 matmuls alone, batch 64", f"{med('floor64'):.2f}"],
            ["optimsweep core, batch 256", f"{med('core256'):.2f}"]],
            f"Training only, medians of {len(rows)} interleaved round(s)."),
        results.Table(["medians of per-round ratios", ""], [
            ["speed-up over the tutorial at batch 64, training only", f"{med('speedup'):.2f}x"],
            ["the same, with each epoch's evaluation pass", f"{med('speedup_eval'):.2f}x"],
            ["the matmuls alone over the tutorial at batch 64 (the ceiling)",
             f"{med('ceiling'):.2f}x"],
            ["the core against its matmuls alone, batch 64", f"{med('core_over_floor'):.2f}x"],
            ["the matmul roofline (best square fp32 multiply)",
             f"{med('roof') / 1e9:.0f} GFLOP/s"],
            ["core at batch 256, share of the roofline "
             f"({FLOP_PER_SAMPLE / 1e6:.1f} MFLOP a sample)", f"{med('share256'):.1%}"]])])


if __name__ == "__main__":
    main()
