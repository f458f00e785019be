"""Holistic (adversarial) distillation, shared by SKD and the ``cirkd`` presets of CWD and IFVD.

A discriminator D scores a logit map z (B x K x h x w) as "teacher-like". The student is pushed to
look like the teacher, D is trained to tell them apart:

    student term      L_adv = lambda_adv * ( -mean D(z_s) )                      (hinge and WGAN alike)
    D, hinge          L_D   = lambda_d * ( mean relu(1 - D(z_t)) + mean relu(1 + D(z_s)) )
    D, WGAN-GP        L_D   = lambda_d * ( mean D(z_s) - mean D(z_t) + lambda_gp * GP )
                      GP    = mean_b ( || d D(x_b) / d x_b ||_2 - 1 )^2,  x = a z_t + (1 - a) z_s,  a ~ U(0, 1) per image

D is the SAGAN discriminator of SKD's and CIRKD's code: BatchNorm on the input logits, four
spectral-normalised 4x4 stride-2 convolutions (width w, 2w, 4w, 8w; leaky ReLU 0.1), a
self-attention block after the third and after the fourth, and a final 4x4 convolution to one channel
whose output map is averaged by the losses. D has its own optimizer (Adam 4e-4, betas (0.9, 0.99) in
CIRKD and IFVD; SGD 4e-4, momentum 0.9 in SKD's code) and one step per iteration, after the
student's step, on the detached outputs of that iteration.

Options (``AdversarialConfig``, mixed into each method's Config): ``adv_weight`` (lambda_adv; 0 means
no discriminator is built at all), ``adv_d_weight`` (lambda_d), ``adv_loss`` (hinge | wgan-gp),
``adv_gp_weight`` (lambda_gp), ``adv_optimizer`` (adam | sgd), ``adv_lr``, ``adv_betas``,
``adv_momentum``, ``adv_weight_decay``, ``adv_lr_power`` (poly decay of D's lr over the run, 0 =
constant; SKD's and IFVD's code decay it with power 0.9, CIRKD does not), ``adv_width``.

Deliberate differences from the original code:
- The stride-2 convolutions pad one pixel top/left and two bottom/right, so an odd-sized map keeps
  its last row/column and a tiny map never shrinks to nothing (the original needs logits of at
  least 16 x 16 to survive four strides and 64 x 64 for the final 4x4 convolution; kdbench's
  embedded benchmark has 8 x 8 logits). For even sizes the windows are exactly the original ones.
  A map smaller than 4 x 4 before the final convolution is zero-padded to 4 x 4. With CIRKD's
  512 x 512 crops (64 x 64 logits) D gives one score per image, as there.
- The leaky-ReLU slope is 0.1 as in both codes (the usual SAGAN value is 0.2).
- CIRKD computes D on the student logits at every step with lambda_adv = lambda_d = 0 for methods
  that do not use it ("runs with weight zero"); kdbench builds D only when lambda_adv > 0.
- The student term is computed through D's parameters detached, so the student's backward pass
  leaves no gradient on D; D's gradients are also zeroed before its own step.
- When student and teacher logits differ in spatial size (output stride 16 vs 8), the student's are
  resized (bilinear) to the teacher's, so D always sees real and fake maps of one size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from kdbench.cuda_graphs import set_lr

from .base import Method, Runtime, float32, fused_on, hparam

# ---------------------------------------------------------------------------------------------
# the losses, as pure functions of discriminator scores


@float32
def hinge_d_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """mean relu(1 - D(t)) + mean relu(1 + D(s)): the teacher is "real", the student "fake"."""
    return F.relu(1.0 - d_teacher).mean() + F.relu(1.0 + d_student).mean()


@float32
def wgan_d_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """mean D(s) - mean D(t): the critic's Wasserstein estimate, negated (the gradient penalty is separate)."""
    return d_student.mean() - d_teacher.mean()


@float32
def generator_loss(d_student: torch.Tensor) -> torch.Tensor:
    """-mean D(s), for hinge and WGAN alike (as in SKD's and CIRKD's code)."""
    return -d_student.mean()


@float32
def gradient_penalty(
    disc: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """mean over images of (||grad_x D(x)||_2 - 1)^2 at x = a real + (1 - a) fake, a ~ U(0, 1) per image."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    x = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x).sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


# ---------------------------------------------------------------------------------------------
# the discriminator


class SelfAttention(nn.Module):
    """SAGAN self-attention: x + gamma * attend(x), gamma starting at 0 so D starts as a plain CNN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.key = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # B x hw x c'
        k = self.key(x).flatten(2)  # B x c' x hw
        attn = torch.softmax(q @ k, dim=-1)  # B x hw x hw
        out = (self.value(x).flatten(2) @ attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class Discriminator(nn.Module):
    """SAGAN discriminator on logits (SKD / CIRKD ``Discriminator``), robust to small maps."""

    def __init__(self, num_classes: int, width: int = 64, slope: float = 0.1) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm2d(num_classes)
        dims = [num_classes, width, 2 * width, 4 * width, 8 * width]
        self.down = nn.ModuleList(spectral_norm(nn.Conv2d(dims[i], dims[i + 1], 4, 2, 0)) for i in range(4))
        self.attn3 = SelfAttention(dims[3])
        self.attn4 = SelfAttention(dims[4])
        self.last = nn.Conv2d(dims[4], 1, 4)
        self.slope = slope

    @float32
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """A score map (B x 1 x h' x w'); 1 x 1 for 64 x 64 logits. Always float32: D sees small
        logit maps, where half precision would only add cast kernels to a step bound by launches."""
        x = self.input_norm(z)
        for i, conv in enumerate(self.down):
            x = F.leaky_relu(conv(F.pad(x, (1, 2, 1, 2))), self.slope)
            if i == 2:
                x = self.attn3(x)
            elif i == 3:
                x = self.attn4(x)
        ph, pw = max(4 - x.shape[-2], 0), max(4 - x.shape[-1], 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return self.last(x)


# ---------------------------------------------------------------------------------------------
# configuration, the module that owns D, and a Method base that wires it to the engine

#: CIRKD's adversarial term: SAGAN discriminator, hinge loss, student-side weight 0.001,
#: discriminator-side weight 0.1, Adam lr 4e-4 betas (0.9, 0.99), constant lr
CIRKD_ADVERSARIAL = {
    "adv_weight": 0.001,
    "adv_d_weight": 0.1,
    "adv_loss": "hinge",
    "adv_optimizer": "adam",
    "adv_lr": 4e-4,
    "adv_betas": (0.9, 0.99),
    "adv_lr_power": 0.0,
}


@dataclass
class AdversarialConfig:
    """The adversarial options every method with a holistic term shares (mixed into its Config)."""

    adv_weight: float = hparam(
        0.0, "student-side adversarial weight lambda_adv (0: no discriminator)", low=1e-4, high=0.1, log=True
    )
    adv_d_weight: float = hparam(0.1, "discriminator-loss weight lambda_d", low=0.01, high=1.0, log=True)
    adv_loss: Literal["hinge", "wgan-gp"] = hparam("hinge", "adversarial loss", choices=("hinge", "wgan-gp"))
    adv_gp_weight: float = hparam(10.0, "WGAN-GP gradient-penalty weight lambda_gp", low=1.0, high=100.0, log=True)
    adv_optimizer: Literal["adam", "sgd"] = hparam("adam", "discriminator optimizer", choices=("adam", "sgd"))
    adv_lr: float = hparam(4e-4, "discriminator learning rate", low=1e-5, high=1e-3, log=True)
    adv_betas: tuple[float, float] = hparam((0.9, 0.99), "Adam betas of the discriminator")
    adv_momentum: float = hparam(0.9, "SGD momentum of the discriminator")
    adv_weight_decay: float = hparam(0.0, "discriminator weight decay")
    adv_lr_power: float = hparam(0.0, "poly decay power of the discriminator lr over the run (0: constant)")
    adv_width: int = hparam(64, "channels of the discriminator's first conv (doubled by each of 4 strides)")

    def __post_init__(self) -> None:
        if self.adv_weight < 0 or self.adv_d_weight < 0 or self.adv_gp_weight < 0:
            raise ValueError("adversarial weights must be >= 0")
        if self.adv_weight > 0 and self.adv_d_weight == 0:
            raise ValueError("adv_weight > 0 with adv_d_weight = 0 would train the student against a frozen random discriminator")
        if len(self.adv_betas) != 2:
            raise ValueError(f"adv_betas: expected two numbers, got {self.adv_betas}")


def match_size(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The student map resized (bilinear) to the teacher's spatial size, when they differ."""
    if s.shape[-2:] == t.shape[-2:]:
        return s
    return F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)


class Adversary(nn.Module):
    """Owns the discriminator: the student-side term, D's optimizer and D's step."""

    def __init__(self, cfg: AdversarialConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = Discriminator(num_classes, cfg.adv_width)

    def make_optimizer(self) -> torch.optim.Optimizer:
        c, params = self.cfg, self.discriminator.parameters()
        fused = fused_on(self.discriminator)
        if c.adv_optimizer == "adam":
            return torch.optim.Adam(params, lr=c.adv_lr, betas=tuple(c.adv_betas), weight_decay=c.adv_weight_decay, fused=fused)
        return torch.optim.SGD(params, lr=c.adv_lr, momentum=c.adv_momentum, weight_decay=c.adv_weight_decay, fused=fused)

    def student_term(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """lambda_adv * -mean D(z_s), through D's parameters detached, so the student's backward
        leaves D untouched (and torch.compile sees one graph, not D's flags toggled mid-forward)."""
        d = self.discriminator
        detached = {name: p.detach() for name, p in d.named_parameters()}
        score = torch.func.functional_call(d, detached, (match_size(z_s, z_t),), tie_weights=False)
        return self.cfg.adv_weight * generator_loss(score)

    def step(self, z_s: torch.Tensor, z_t: torch.Tensor, optimizer: torch.optim.Optimizer, rt: Runtime) -> torch.Tensor:
        """One discriminator step on detached logits; returns the weighted D loss (detached).

        D and its losses run in float32. Across processes D's gradients are averaged before its step."""
        c, d = self.cfg, self.discriminator
        z_s, z_t = match_size(z_s.detach(), z_t).detach(), z_t.detach()
        optimizer.zero_grad(set_to_none=True)  # nothing from the student's pass may leak into D's step
        d_s, d_t = d(z_s), d(z_t)
        if c.adv_loss == "hinge":
            loss = hinge_d_loss(d_t, d_s)
        else:
            loss = wgan_d_loss(d_t, d_s) + c.adv_gp_weight * gradient_penalty(d, z_t, z_s)
        loss = c.adv_d_weight * loss
        rt.backward(loss, "discriminator")
        rt.all_reduce_grads(d.parameters())
        rt.step(optimizer, "discriminator")
        return loss.detach()

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> None:
        if self.cfg.adv_lr_power > 0 and total_steps > 0:
            lr = self.cfg.adv_lr * max(0.0, 1 - step / total_steps) ** self.cfg.adv_lr_power
            for group in optimizer.param_groups:
                set_lr(group, lr)  # in place where a CUDA graph of the step reads it


class AdversarialMethod(Method):
    """A Method with an optional holistic term; no ``name``, so it is never registered itself.

    Subclasses call ``self.build_adversary()`` in ``__init__`` and add ``self.adversarial_terms(...)``
    to their loss dict."""

    adversary: Adversary | None

    @classmethod
    def inert_options(cls, cfg: AdversarialConfig) -> set[str]:
        """Without a discriminator (adv_weight 0) its other options change nothing."""
        return set() if cfg.adv_weight > 0 else {f.name for f in fields(AdversarialConfig)} - {"adv_weight"}

    def build_adversary(self) -> None:
        cfg: AdversarialConfig = self.cfg
        if cfg.adv_weight > 0:
            if self.student_spec.num_classes != self.teacher_spec.num_classes:
                raise ValueError("adversarial term: student and teacher predict different numbers of classes")
            self.adversary = Adversary(cfg, self.teacher_spec.num_classes)
        else:
            self.adversary = None

    def adversarial_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.adversary is None:
            return {}
        return {"adv": self.adversary.student_term(student["logits"], teacher["logits"])}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {} if self.adversary is None else {"discriminator": self.adversary.make_optimizer()}

    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        if self.adversary is not None:
            self.adversary.set_lr(self._own_optimizers["discriminator"], step, total_steps)

    def own_step(self, student, teacher, target, rt) -> dict[str, torch.Tensor]:
        if self.adversary is None:
            return {}
        opt = self._own_optimizers["discriminator"]
        return {"adv_disc": self.adversary.step(student["logits"], teacher["logits"], opt, rt)}
