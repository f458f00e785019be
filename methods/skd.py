"""SKD: structured knowledge distillation (Liu et al., "Structured Knowledge Distillation for
Semantic Segmentation", CVPR 2019).

Three terms:

    pixel-wise   KD on every pixel of the logits z: kd.kd_loss, mean over pixels of T^2 KL(p_t || p_s)
                 (``pixel_loss=kl``), or the original code's soft-target cross-entropy
                 mean over pixels of -sum_k p_t,k log p_s,k (``pixel_loss=ce``; same gradient, the
                 value is larger by the teacher's entropy)
    pair-wise    on a feature f (``decoder``): max-pool f into a grid of M nodes, L2-normalise each
                 node's C-vector, per image the affinity A = F^T F (M x M), and
                     L_pa = 1 / (B M^2) * sum_b sum_{i,j} (A_s,b,ij - A_t,b,ij)^2
                 (affinities are M x M, so student and teacher may have different channel counts;
                 with more nodes than channels the same sum comes from C x C Gram matrices)
    holistic     a discriminator on the logits, trained adversarially with its own optimizer
                 (adversarial.py)

    L = w_pi * L_pi + w_pa * L_pa + L_adv

Options: ``pixel_weight``/``pixel_temperature``/``pixel_loss``; ``pair_weight``, ``feature``,
``pool_kernel`` (k x k max-pool with stride k, ceil mode, as CIRKD) or ``pool_scale`` > 0 (kernel =
int(scale * map size), as the original code: 0.5 gives a 2 x 2 grid of nodes), ``detach_norm`` (the
original code divides by a detached L2 norm, CIRKD does not); the adversarial options ``adv_*``.

Presets:
    ``cirkd``  (default) CIRKD's train_skd.sh: pixel KD 1 (T = 1); pair-wise with a 2x2 stride-2
               max-pool, weight 10; hinge adversarial term, lambda_adv 0.001, lambda_d 0.1, Adam 4e-4,
               betas (0.9, 0.99), constant lr
    ``paper``  the authors' code (run_train_val.sh): pixel soft-target CE, weight 10; pair-wise
               pooled to a 2 x 2 grid (pool_scale 0.5), detached norm, weight 0.5; WGAN-GP
               (lambda_gp 10) with lambda_adv = lambda_d = 0.1; the discriminator trained with SGD
               lr 4e-4, momentum 0.9, weight decay 5e-4, poly-decayed (power 0.9) like the student
    ``pure``   the pair-wise term alone, CIRKD's pooling and weight (10)

Deliberate differences from the original code: the original pixel term sums over the images of a
batch (divides by h*w only), i.e. it grows with the batch size; kdbench averages over all pixels, as
the paper's formula does (``paper`` therefore uses the paper's scale: weight 10 on the per-pixel mean).
When student and teacher maps differ in spatial size, the student's map is resized (bilinear) to the
teacher's before pooling. The pooling kernel never exceeds the map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .adversarial import CIRKD_ADVERSARIAL, AdversarialConfig, AdversarialMethod, match_size
from .base import float32, hparam
from .kd import kd_loss

FEATURES = ("decoder", "encoder", "backbone", "low")


@float32
def soft_cross_entropy(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over pixels of T^2 * -sum_k p_t,k log p_s,k (SKD code's pixel-wise term), softmax over dim 1."""
    if s.shape != t.shape:
        raise ValueError(f"soft_cross_entropy: shapes differ {tuple(s.shape)} vs {tuple(t.shape)}")
    p_t = F.softmax(t / temperature, dim=1)
    ce = -(p_t * F.log_softmax(s / temperature, dim=1)).sum(dim=1)
    return ce.mean() * temperature**2


def node_pool(f: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """kh x kw max-pool with stride = kernel, ceil mode: one node per cell.

    A large window (``pool_scale`` 0.5: 64 x 64 on VOC's 129 x 129 maps) pooled in one pass gives
    each GPU thread a whole window to scan (4 ms of an SKD ``paper`` step on an H100); along rows
    and then along columns it is the same maxima, and the same gradient (to the first maximum in
    row-major order, as ``max_pool2d``'s)."""
    if kh * kw <= 16:
        return F.max_pool2d(f, (kh, kw), stride=(kh, kw), ceil_mode=True)
    f = F.max_pool2d(f, (1, kw), stride=(1, kw), ceil_mode=True)
    return F.max_pool2d(f, (kh, 1), stride=(kh, 1), ceil_mode=True)


def _nodes(f: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """B x C x M: every node's C-vector L2-normalised."""
    if detach_norm:
        f = f / (f.norm(dim=1, keepdim=True).detach() + 1e-8)
    else:
        f = F.normalize(f, p=2, dim=1)
    return f.flatten(2)


def _gram_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a b^T||_F^2 summed over the batch: a C_a x C_b Gram matrix per image."""
    return (a @ b.transpose(1, 2)).square().sum()


@float32
def pairwise_loss(
    fs: torch.Tensor,
    ft: torch.Tensor,
    pool_kernel: int | None = 2,
    pool_scale: float | None = None,
    detach_norm: bool = False,
) -> torch.Tensor:
    """Mean of (A_s - A_t)^2 over images and node pairs; nodes are max-pooled cells of the map.

    ``pool_scale`` (if given) sets the kernel to int(scale * size) per axis, like the original code;
    otherwise ``pool_kernel`` x ``pool_kernel`` (None or 1: every pixel is a node)."""
    fs = match_size(fs, ft)
    h, w = ft.shape[-2:]
    if pool_scale:
        kh, kw = max(int(h * pool_scale), 1), max(int(w * pool_scale), 1)
    else:
        kh = kw = pool_kernel or 1
    kh, kw = min(kh, h), min(kw, w)
    if kh > 1 or kw > 1:
        fs, ft = node_pool(fs, kh, kw), node_pool(ft, kh, kw)
    ns, nt = _nodes(fs, detach_norm), _nodes(ft, detach_norm)
    b, m = ns.shape[0], ns.shape[2]
    if m <= ns.shape[1] + nt.shape[1]:
        a_s, a_t = ns.transpose(1, 2) @ ns, nt.transpose(1, 2) @ nt  # B x M x M
        return ((a_s - a_t) ** 2).mean()
    # More nodes than channels (VOC: 65 x 65 nodes of 256 channels): the same sum without the
    # M x M affinities, ||Ns^T Ns - Nt^T Nt||^2 = ||Ns Ns^T||^2 + ||Nt Nt^T||^2 - 2 ||Ns Nt^T||^2,
    # from C x C Gram matrices (M/C times fewer products and no B x M x M tensors). The difference of
    # sums loses digits when the affinities nearly agree; see docs/methods.md for the tolerance.
    return (_gram_sq(ns, ns) + _gram_sq(nt, nt) - 2 * _gram_sq(ns, nt)) / (b * m * m)


@dataclass
class SKDConfig(AdversarialConfig):
    adv_weight: float = hparam(
        0.001, "student-side adversarial weight lambda_adv (0: no discriminator)", low=1e-4, high=0.1, log=True
    )
    pixel_weight: float = hparam(1.0, "weight of the pixel-wise term (0: off)", low=0.1, high=20.0, log=True)
    pixel_temperature: float = hparam(1.0, "temperature of the pixel-wise term", low=1.0, high=8.0)
    pixel_loss: Literal["kl", "ce"] = hparam("kl", "kl: KD (CIRKD); ce: soft-target cross-entropy (SKD code)", choices=("kl", "ce"))
    pair_weight: float = hparam(10.0, "weight of the pair-wise term (0: off)", low=0.1, high=50.0, log=True)
    feature: Literal["decoder", "encoder", "backbone", "low"] = hparam("decoder", "feature of the pair-wise term", choices=FEATURES)
    pool_kernel: int = hparam(2, "pair-wise max-pool kernel = stride (1: every pixel is a node)")
    pool_scale: float = hparam(0.0, "if > 0: pool kernel = int(scale * map size), e.g. 0.5 -> 2x2 nodes (SKD code)")
    detach_norm: bool = hparam(False, "divide by a detached L2 norm (SKD code)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.pixel_weight, self.pair_weight) < 0:
            raise ValueError("skd: weights must be >= 0")
        if self.pixel_temperature <= 0:
            raise ValueError("skd: pixel_temperature must be > 0")
        if self.pool_kernel < 1 or not 0 <= self.pool_scale <= 1:
            raise ValueError("skd: pool_kernel must be >= 1 and pool_scale in [0, 1]")


class SKD(AdversarialMethod):
    """Structured KD: pixel-wise KD + pair-wise affinities + a holistic discriminator."""

    name = "skd"
    Config = SKDConfig
    presets = {
        "cirkd": {
            "pixel_weight": 1.0,
            "pixel_temperature": 1.0,
            "pixel_loss": "kl",
            "pair_weight": 10.0,
            "pool_kernel": 2,
            "pool_scale": 0.0,
            "detach_norm": False,
            **CIRKD_ADVERSARIAL,
        },
        "paper": {
            "pixel_weight": 10.0,
            "pixel_temperature": 1.0,
            "pixel_loss": "ce",
            "pair_weight": 0.5,
            "pool_scale": 0.5,
            "detach_norm": True,
            "adv_weight": 0.1,
            "adv_d_weight": 0.1,
            "adv_loss": "wgan-gp",
            "adv_gp_weight": 10.0,
            "adv_optimizer": "sgd",
            "adv_lr": 4e-4,
            "adv_momentum": 0.9,
            "adv_weight_decay": 5e-4,
            "adv_lr_power": 0.9,
        },
        "pure": {"pixel_weight": 0.0, "pair_weight": 10.0, "pool_kernel": 2, "pool_scale": 0.0, "adv_weight": 0.0},
    }
    default_preset = "cirkd"

    def __init__(self, cfg: SKDConfig, student, teacher) -> None:
        super().__init__(cfg, student, teacher)
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"skd: student and teacher predict {student.num_classes} vs {teacher.num_classes} classes")
        self.build_adversary()

    def forward(self, student, teacher, target) -> dict[str, torch.Tensor]:
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if c.pixel_weight > 0:
            z_s, z_t = match_size(student["logits"], teacher["logits"]), teacher["logits"]
            pixel = kd_loss if c.pixel_loss == "kl" else soft_cross_entropy
            terms["kd"] = c.pixel_weight * pixel(z_s, z_t, c.pixel_temperature)
        if c.pair_weight > 0:
            pool_scale = c.pool_scale or None
            pa = pairwise_loss(student[c.feature], teacher[c.feature], c.pool_kernel, pool_scale, c.detach_norm)
            terms["pairwise"] = c.pair_weight * pa
        terms.update(self.adversarial_terms(student, teacher))
        return terms
