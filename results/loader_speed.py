"""Images per second a recipe's training loader delivers, for several worker counts, without timing
any step (``kdbench bench`` times the loader too, but only after the recipe's steps, which at the
VOC recipes' shapes take minutes on a CPU).

    python3 results/voc_like_jpegs.py /tmp/voclike 60 4
    KDBENCH_VOC_ROOT=/tmp/voclike python3 results/loader_speed.py [RECIPE [WORKERS [BATCHES]]]

Defaults: voc_r101_r18, workers 1,2, 60 batches. The README's uint8-loader figures are medians of
three alternating runs of this script in checkouts of each version (PYTHONPATH=CHECKOUT).
"""

import sys

from kdbench.bench import loader_throughput
from kdbench.recipe import load_recipe
from kdbench.runtime import Runtime

if __name__ == "__main__":
    if len(sys.argv) > 4:
        sys.exit(__doc__)
    recipe, workers, batches = (sys.argv[1:] + ["voc_r101_r18", "1,2", "60"][len(sys.argv) - 1 :])[:3]
    for w in workers.split(","):
        r = load_recipe(recipe, [f"data.workers={w}", "data.use_sbd=false"])
        result = loader_throughput(r, Runtime(), int(batches))
        print(f"{recipe}: {w} workers, {result.get('images_per_s', float('nan')):.1f} images/s {result.get('skipped', '')}".rstrip(), flush=True)
