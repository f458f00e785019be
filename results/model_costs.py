"""The README's table of the shipped recipes' models: parameters and multiply-adds (GMACs) of one
image at each recipe's training crop, as `kdbench table --extra` and `kdbench bench` report them.

    python results/model_costs.py
"""

from __future__ import annotations

from kdbench.data import class_names
from kdbench.models import build_model
from kdbench.models.complexity import multiply_adds
from kdbench.recipe import load_recipe
from kdbench.table import giga

RECIPES = ["default", "voc_r101_r18", "voc_r101_mbv2", "cityscapes_r101_r18", "cityscapes_r101_mbv2", "cirkd_cityscapes_r101_r18"]
NO_WEIGHTS = ["teacher.pretrained=false", "student.pretrained=false"]  # counting needs shapes, not ImageNet weights

print("| recipe | crop | teacher | params | GMACs | student | params | GMACs |")
print("| --- | --- | --- | ---: | ---: | --- | ---: | ---: |")
for name in RECIPES:
    recipe = load_recipe(name, NO_WEIGHTS)
    k = len(class_names(recipe.data.dataset))
    cells = [f"`{name}`", " x ".join(map(str, recipe.train.crop_size))]
    for cfg in (recipe.teacher, recipe.student):
        model = build_model(cfg, k, pretrained=False)
        params = sum(p.numel() for p in model.parameters())
        cells += [f"{cfg.arch} {cfg.backbone} OS{cfg.output_stride}", f"{params / 1e6:.2f} M", giga(multiply_adds(model, recipe.train.crop_size))]
    print("| " + " | ".join(cells) + " |")
