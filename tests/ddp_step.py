"""One training step of the tiny recipe's models, alone or under torchrun; rank 0 writes every
gradient (student and the method's connector) to the file named by the first argument.

BatchNorm and dropout are taken out of the student: with them a process's statistics and masks
depend on its slice of the batch, so one and two processes would differ by design. The method is
CWD on the logits and on the decoder feature, whose connector lives outside DistributedDataParallel
and is averaged by the engine itself; labels carry no ignore pixels, so every process's mean
cross-entropy covers as many pixels as the others'.
"""

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.engine import build_state, train_batches, train_step
from kdbench.methods import method_for, resolve_config
from kdbench.models import build_model
from kdbench.recipe import load_recipe
from kdbench.runtime import make_runtime, shutdown


def without_batchnorm_and_dropout(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.Dropout)):
                setattr(module, name, nn.Identity())
    return model


def main(out: str) -> None:
    recipe = load_recipe("tiny", ["method.feature_weight=50.0", "runtime.device=cpu"], method="cwd")
    rt = make_runtime(recipe.runtime)
    k = 9
    torch.manual_seed(0)
    teacher = build_model(recipe.teacher, k).eval().requires_grad_(False)
    student = without_batchnorm_and_dropout(build_model(recipe.student, k))
    _, cfg = resolve_config("cwd", recipe.method.preset, recipe.method.params)
    method = method_for("cwd", cfg, student, teacher, k)
    state = build_state(student, method, teacher, recipe.train, rt)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, k, (8, 32, 32), generator=g))
    images, target = next(iter(train_batches(data, 4, seed=3, start_step=0, total_steps=1, workers=0, rt=rt)))
    train_step(state, images, target)
    grads = {f"student.{n}": p.grad for n, p in state.student.named_parameters()}
    grads.update({f"method.{n}": p.grad for n, p in state.method.named_parameters() if p.grad is not None})
    if rt.is_main:
        torch.save(grads, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
