"""AttnFD: attention-guided feature distillation (Mansourian et al., arXiv 2403.05451).

For each distilled layer l (default: ``backbone``, ``encoder``, ``decoder``)

    F_s' = connector( CBAM_s(f_s) )        learnable CBAM, then 1x1 conv (no bias) + BN to C_t
    F_t' = A_t(f_t)                        teacher-side refinement, see ``teacher_attention``
    L    = alpha * sum_l  D( F_s', F_t' )

with CBAM(x) = x * Mc * Ms (channel gate, then spatial gate; Woo et al., ECCV 2018).

The paper, its released code and the authors' answers disagree on two points; each reading is an
option, and the presets name the combinations:

``teacher_attention``
    ``free``        parameter-free gates on the frozen teacher feature: Mc = sigmoid(avgpool + maxpool)
                    per channel, Ms = sigmoid(channel-max + channel-mean) (the authors' development code)
    ``pretrained``  CBAMs trained inside the teacher's forward pass, then frozen with it (the paper);
                    kdbench trains such a teacher itself (teacher.attention_taps), cached separately
    ``random``      CBAMs with random, frozen weights on the teacher feature (what the released code does)
``normalize``
    ``batch``       each map divided by its one L2 norm over B x C x H x W; D = sum (F_s' - F_t')^2 / B
                    (the released code; the authors say it is the correct one)
    ``channel``     each pixel's C-vector L2-normalised; D = sum over pixels and batch of ||u_s - u_t||_2
                    divided by H*W (``squared``: ||.||_2^2) (the paper's wording, the development code)

Presets: ``default`` = free + batch, alpha 2 (the official VOC alpha); ``paper`` = pretrained +
channel; ``code`` = random + batch with the released code's training details (train_kd.py and
distiller.py at commit f090bbe):

- warm-up: in the first epoch only the connectors train; the student (backbone, head and its CBAMs)
  is not updated at all (``connector_warmup_epochs`` 1, ``warmup_freezes_student``). Afterwards
  the connectors are frozen and the student trains;
- the student's channel-gate MLP is never updated (``freeze_channel_mlp``);
- connectors start from He's fan-out init: conv ~ N(0, 2 / (k*k*C_out)), BN weight 1, bias 0
  (``connector_init: he``);
- the teacher runs in train mode during distillation: its BatchNorm normalises with each batch's
  statistics and updates its running statistics (``teacher_train_mode``); its weights stay frozen.

The random teacher CBAMs belong to the teacher (in the released code they sit inside it): they run
in the teacher's mode, so without ``teacher_train_mode`` their BatchNorm uses its initial
statistics (the identity) and with it each batch's statistics, as the released code's.

Deliberate difference: when student and teacher maps differ in spatial size (e.g. output stride 16
vs 8), the student map is resized to the teacher's (bilinear) instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.cbam import CBAM, channel_descriptors, spatial_descriptor

from .base import Method, float32, hparam

LAYERS = ("backbone", "encoder", "decoder")


def free_attention(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free CBAM on CBAM's own pooling: channel gate sigmoid(avg + max over space), then
    spatial gate sigmoid(max + mean over channels) on the channel-refined map."""
    avg, mx = channel_descriptors(x)
    x = x * torch.sigmoid(avg + mx)
    return x * torch.sigmoid(spatial_descriptor(x).sum(dim=1, keepdim=True))


@float32
def batch_normalized_distance(fs: torch.Tensor, ft: torch.Tensor, expanded: bool | None = None) -> torch.Tensor:
    """Each map over its single L2 norm (whole B x C x H x W tensor); squared differences summed, / B.

    ``expanded`` (default: on a GPU) takes the same value from three sums of one pass over both maps,
    |s/|s| - t/|t||^2 = 2 - 2 <s, t> / (|s| |t|), so the backward is one elementwise pass with no
    reduction of its own. On a CPU the direct form keeps the rounding the embedded benchmark's
    results were made with."""
    if fs.is_cuda if expanded is None else expanded:
        cos = (fs * ft).sum() / (fs.square().sum().sqrt() * ft.square().sum().sqrt())
        return (2 - 2 * cos).clamp_min(0) / fs.shape[0]  # a cos rounded to 1 + ulp: no negative distance
    return ((fs / fs.norm() - ft / ft.norm()) ** 2).sum() / fs.shape[0]


@float32
def channel_normalized_distance(fs: torch.Tensor, ft: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Per-pixel channel vectors L2-normalised; their L2 distance summed over batch and pixels, / (H*W)."""
    d = (F.normalize(fs, dim=1) - F.normalize(ft, dim=1)).norm(dim=1)
    d = d**2 if squared else d
    return d.sum() / (fs.shape[2] * fs.shape[3])


@float32
def attnfd_distance(fs: torch.Tensor, ft: torch.Tensor, normalize: str = "batch", squared: bool = False) -> torch.Tensor:
    """D(F_s', F_t') of one layer; the student map is resized to the teacher's when sizes differ."""
    if fs.shape[-2:] != ft.shape[-2:]:
        fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
    if normalize == "batch":
        return batch_normalized_distance(fs, ft)
    return channel_normalized_distance(fs, ft, squared)


def connector(c_in: int, c_out: int, init: str = "torch") -> nn.Sequential:
    """1x1 conv (no bias) + BN from the student's channels to the teacher's. ``he``: conv weights
    ~ N(0, 2 / n), n = k*k*c_out (He's fan-out init), BN weight 1 and bias 0."""
    conv, bn = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
    if init == "he":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@dataclass
class AttnFDConfig:
    alpha: float = hparam(2.0, "weight of the summed layer distances (channel normalisation: ~100x smaller)", low=0.001, high=20.0, log=True)
    layers: list[str] = hparam(list(LAYERS), "distilled taps: any of backbone, encoder, decoder")
    teacher_attention: Literal["free", "pretrained", "random"] = hparam(
        "free", "teacher-side refinement", choices=("free", "pretrained", "random")
    )
    normalize: Literal["batch", "channel"] = hparam("batch", "feature normalisation", choices=("batch", "channel"))
    squared: bool = hparam(False, "channel normalisation: squared L2 distance instead of L2")
    reduction: int = hparam(16, "CBAM channel-MLP reduction ratio")
    connector_warmup_epochs: int = hparam(0, "train only the connectors for this many epochs, then freeze them")
    warmup_freezes_student: bool = hparam(
        False, "during the connector warm-up the student and its CBAMs are not updated at all (else they train on the task loss and distillation)"
    )
    freeze_channel_mlp: bool = hparam(False, "never update the student CBAM's channel-gate MLP")
    connector_init: Literal["torch", "he"] = hparam(
        "torch", "connector init: PyTorch's default, or he: conv ~ N(0, 2/(k*k*C_out)), BN weight 1, bias 0", choices=("torch", "he")
    )
    teacher_train_mode: bool = hparam(
        False, "run the frozen teacher in train mode: BatchNorm with each batch's statistics, running statistics updated"
    )

    def __post_init__(self) -> None:
        bad = [layer for layer in self.layers if layer not in LAYERS]
        if bad or not self.layers:
            raise ValueError(f"attnfd layers: expected a non-empty subset of {list(LAYERS)}, got {self.layers}")
        if self.alpha < 0:
            raise ValueError(f"attnfd: alpha must be >= 0, got {self.alpha}")


class AttnFD(Method):
    """Attention-guided feature distillation: CBAM-refined features, plain MSE."""

    name = "attnfd"
    Config = AttnFDConfig
    presets = {
        "paper": {"teacher_attention": "pretrained", "normalize": "channel"},
        "code": {
            "teacher_attention": "random",
            "normalize": "batch",
            "connector_warmup_epochs": 1,
            "warmup_freezes_student": True,
            "freeze_channel_mlp": True,
            "connector_init": "he",
            "teacher_train_mode": True,
        },
    }

    structural = {
        "teacher_attention": "'pretrained' needs a teacher trained with CBAMs inside (another cached teacher)",
        "layers": "the distilled taps decide the teacher's CBAM taps and the modules a run builds",
    }

    @classmethod
    def inert_options(cls, cfg: AttnFDConfig) -> set[str]:
        inert = set() if cfg.normalize == "channel" else {"squared"}
        return inert if cfg.connector_warmup_epochs else inert | {"warmup_freezes_student"}

    @classmethod
    def teacher_requirements(cls, cfg: AttnFDConfig) -> dict:
        return {"attention_taps": tuple(cfg.layers)} if cfg.teacher_attention == "pretrained" else {}

    def __init__(self, cfg: AttnFDConfig, student, teacher) -> None:
        super().__init__(cfg, student, teacher)
        if cfg.teacher_attention == "pretrained" and set(cfg.layers) - set(teacher.attention_taps):
            raise ValueError(f"attnfd: teacher_attention=pretrained needs a teacher with attention_taps {cfg.layers}")
        self.student_cbam = nn.ModuleDict({k: CBAM(student.channels[k], cfg.reduction) for k in cfg.layers})
        self.connectors = nn.ModuleDict({k: connector(student.channels[k], teacher.channels[k], cfg.connector_init) for k in cfg.layers})
        if cfg.teacher_attention == "random":
            self.teacher_cbam = nn.ModuleDict({k: CBAM(teacher.channels[k], cfg.reduction) for k in cfg.layers})
            self.teacher_cbam.requires_grad_(False)
        self._train_student_cbams(True)
        self._warming_up = False

    @property
    def teacher_mode(self) -> str:  # type: ignore[override]
        return "train" if self.cfg.teacher_train_mode else "eval"

    def _train_student_cbams(self, on: bool) -> None:
        self.student_cbam.requires_grad_(on)
        if self.cfg.freeze_channel_mlp:
            for cbam in self.student_cbam.values():
                cbam.channel_gate.requires_grad_(False)

    def train(self, mode: bool = True) -> "AttnFD":
        super().train(mode)
        if self.cfg.teacher_attention == "random":  # part of the teacher: in its mode
            self.teacher_cbam.train(mode and self.cfg.teacher_train_mode)
        return self

    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        warmup = self.cfg.connector_warmup_epochs * steps_per_epoch
        if warmup:
            self._warming_up = step < warmup
            self.connectors.requires_grad_(self._warming_up)
            if self.cfg.warmup_freezes_student:
                self.student_frozen = self._warming_up
                self._train_student_cbams(not self._warming_up)

    def refine_teacher(self, layer: str, f: torch.Tensor) -> torch.Tensor:
        if self.cfg.teacher_attention == "free":
            return free_attention(f)
        if self.cfg.teacher_attention == "random":
            return self.teacher_cbam[layer](f)
        return f  # pretrained: the teacher's own CBAM already refined it in its forward pass

    def forward(self, student, teacher, target) -> dict[str, torch.Tensor]:
        c = self.cfg
        total = 0.0
        for layer in c.layers:
            fs = student[layer].detach() if self._warming_up else student[layer]
            fs = self.connectors[layer](self.student_cbam[layer](fs))
            with torch.no_grad():
                ft = self.refine_teacher(layer, teacher[layer].detach())  # detached even if refined by nothing
            total = total + attnfd_distance(fs, ft, c.normalize, c.squared)
        return {"attnfd": c.alpha * total}
