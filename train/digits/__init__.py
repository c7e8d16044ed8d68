"""The embedded digits model: a tiny but real SDXL-format text-to-image model of handwritten
digits, built from scratch here because no SDXL weights can be downloaded (ARCHITECTURE.md,
"Embedded default").

    data.py      scikit-learn's digits as 32×32 RGB, the train/held-out split, the prompts
    text.py      locally generated CLIP tokenizers and random CLIP text encoders
    builder.py   VAE and UNet training, the diffusers folder, its cache (`ensure_digits_model`)
    shards.py    the digits as webdataset shards in img2dataset's layout (the default data)
    metrics.py   digit classifier, digits-FD and prompt accuracy of a pipeline or an export
    grids.py     side-by-side image grids of the benchmarks
    plugins.py   what the plugin benchmark measures: stroke width, silhouettes and their IoU
    plugin_training.py  a style LoRA and a silhouette ControlNet trained for the teacher
    evaluate.py  the command line: `python -m train.digits.evaluate --model DIR ...`

Generic code reaches this package only through `train/embedded.py`, the config's
embedded-model resolver; what it needs is exported here.
"""

from train.digits.builder import ensure_digits_model
from train.digits.data import DIGIT_PROMPTS
from train.digits.metrics import evaluate_export
from train.digits.shards import ensure_digits_shards

__all__ = ["DIGIT_PROMPTS", "ensure_digits_model", "ensure_digits_shards", "evaluate_export"]
