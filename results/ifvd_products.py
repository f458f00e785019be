"""Ways to compute IFVD's class-similarity map, timed and checked on one device: the experiment
that decides how `methods/ifvd.py` takes its class sums on a GPU.

Why: on an H200 (VOC shapes, bf16, compiled, CUDA graphs) IFVD `cirkd` costs 1.322x the floor
against a 1.30 target, and its compiled profile puts 1.25 ms per step in float32 batched matrix
products on CUDA cores (32 x 32 FFMA tiles, 10 calls): the one-hot products. Their shapes are the
cause: a product that sums N = 129 x 129 pixels into C x (K+1) = 256 x 22 outputs has few output tiles
and one long loop each, so most of the GPU idles. The candidates:

    scatter  scatter_add into class bins (the CPU route; atomic adds on a GPU, rounding varies per run)
    onehot   one product with the B x N x (K+1) one-hot matrix (the GPU route today)
    chunked  the same products with the pixels cut into S chunks, one batched product per chunk,
             summed after: S times the output tiles, each loop 1/S as long (split-K by hand)
    tf32     onehot with TF32 products: a speed ceiling only. The one-hot matrix and bf16 features
             are exact in TF32, the prototypes and gradients are not

Each is timed forward and backward for a student map (with gradient) and a teacher map (without), as
`ifv_loss` runs them, eagerly and under torch.compile: the wall time per call and, on a GPU, the
kernels' own time (the profiler's device time: what the route costs inside a training step's CUDA
graph, where launches cost nothing). Each is compared with a float64 computation: the
largest error of the map M and of the student's gradient, relative to the largest value of each.
Features are bf16 values held in float32 (what the loss gets under bf16 autocast); labels are blocks
of a few classes, as segmentation labels are.

    python3 results/ifvd_products.py --device cuda                  # VOC shapes: B 6, C 256, 129 x 129, 21 classes
    python3 results/ifvd_products.py --device cpu --size 17 --batch 2 --channels 8 --reps 2 --no-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdbench.methods.ifvd import class_bins, class_similarity_map

Route = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def chunked(f: torch.Tensor, labels: torch.Tensor, num_classes: int, chunks: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``class_similarity_map``'s one-hot route with its two products over pixels split into chunks."""
    b, c = f.shape[:2]
    feats = f.flatten(2)  # B x C x N
    n = feats.shape[-1]
    bins, valid = class_bins(labels, num_classes)
    members = F.one_hot(bins, num_classes + 1).to(feats.dtype)  # B x N x (K+1)
    m = -(-n // chunks)  # pixels per chunk; the last is padded with zero features outside every class
    pad = m * chunks - n
    parts = F.pad(feats, (0, pad)).view(b, c, chunks, m).transpose(1, 2)  # B x S x C x M
    onehot = F.pad(members, (0, 0, 0, pad)).view(b, chunks, m, num_classes + 1)  # B x S x M x (K+1)
    protos = (parts @ onehot).sum(1) / (members.sum(dim=1, keepdim=True) + 1e-6)  # B x C x (K+1)
    dots = protos.transpose(1, 2).unsqueeze(1) @ parts  # B x S x (K+1) x M
    dots = dots.transpose(1, 2).reshape(b, num_classes + 1, chunks * m)[..., :n].gather(1, bins[:, None])[:, 0]
    norm_f = feats.norm(dim=1).clamp_min(1e-8)
    norm_c = protos.norm(dim=1).clamp_min(1e-8).gather(1, bins)
    return dots / (norm_f * norm_c), valid


def tf32(f: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return class_similarity_map(f, labels, num_classes, onehot=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


ROUTES: dict[str, Route] = {
    "scatter": lambda f, lab, k: class_similarity_map(f, lab, k, onehot=False),
    "onehot": lambda f, lab, k: class_similarity_map(f, lab, k, onehot=True),
    "chunked": chunked,
    "tf32": tf32,
}


def inputs(batch: int, channels: int, size: int, classes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    fs, ft = (torch.randn(batch, channels, size, size, generator=g).relu().bfloat16().float() for _ in range(2))
    blocks = torch.randint(0, classes, (batch, 1, 4, 4), generator=g).float()  # a few classes per image
    labels = F.interpolate(blocks, size=(size, size), mode="nearest")[:, 0].long()
    labels[torch.rand(batch, size, size, generator=g) < 0.05] = -1  # ignore-labelled pixels
    return fs.to(device), ft.to(device), labels.to(device)


def loss_and_grad(route: Route, fs: torch.Tensor, ft: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    fs = fs.detach().requires_grad_(True)
    m_s, valid = route(fs, labels, k)
    with torch.no_grad():
        m_t, _ = route(ft, labels, k)
    loss = (((m_s - m_t) ** 2) * valid).sum() / valid.numel()
    loss.backward()
    return m_s.detach(), fs.grad


def kernel_ms(step: Callable[..., object], args: tuple, reps: int) -> float:
    """The GPU's own time per call: the device time of every kernel, summed (no launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step(*args)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / reps


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=129)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    fs, ft, labels = inputs(args.batch, args.channels, args.size, args.classes, device)
    want_m, want_g = loss_and_grad(ROUTES["scatter"], fs.double(), ft.double(), labels, args.classes)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for name, route in ROUTES.items():
        if name == "tf32" and device.type != "cuda":
            continue
        for compiled in (False,) if args.no_compile or name == "tf32" else (False, True):
            step = torch.compile(loss_and_grad, dynamic=False) if compiled else loss_and_grad
            for _ in range(3):  # compiling, autotuning, the allocator's growth
                m, g = step(route, fs, ft, labels, args.classes)
            ms = []
            for _ in range(args.reps):
                sync()
                start = time.perf_counter()
                step(route, fs, ft, labels, args.classes)
                sync()
                ms.append(1000 * (time.perf_counter() - start))
            device_ms = kernel_ms(step, (route, fs, ft, labels, args.classes), args.reps) if device.type == "cuda" else None
            err_m = ((m.double() - want_m).abs().max() / want_m.abs().max()).item()
            err_g = ((g.double() - want_g).abs().max() / want_g.abs().max()).item()
            rows.append({"route": name, "compiled": compiled, "ms": statistics.median(ms), "ms_min": min(ms), "device_ms": device_ms, "rel_err_map": err_m, "rel_err_grad": err_g})
            kernels = f", kernels {device_ms:.3f} ms" if device_ms is not None else ""
            print(f"{name:8s} {'compiled' if compiled else 'eager':8s} {statistics.median(ms):8.3f} ms (min {min(ms):.3f}){kernels}  "
                  f"max rel. error: map {err_m:.1e}, student grad {err_g:.1e}", flush=True)
    if args.json:
        setting = {k: v for k, v in vars(args).items() if k != "json"}
        setting["torch"] = torch.__version__
        setting["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        with open(args.json, "w") as fh:
            json.dump({"setting": setting, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
