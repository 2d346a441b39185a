"""Fashion-MNIST images and free-text captions for the embedded testbed.

Images come from the Debian package ``dataset-fashion-mnist`` (idx files). Captions are built from class
synonyms and sentence templates in three disjoint splits (synonyms *and* templates):

- ``"train"``: the only wording the denoisers, the classifier and the tiny CLIP were trained on;
- ``"calib"``: wording for calibration (``testbed-calib``), never trained on and never evaluated on. A user's
  calibration prompts are new sentences to their model; calibrating on memorised training captions measured
  the wrong regime (their JAQ gains did not carry over to new wording; BENCHMARKS.md, "Default path");
- ``"heldout"``: wording for every evaluation (``testbed-heldout``).
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_DIR_ENV = "QSCHED_FASHION_MNIST"
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# Synonyms per class: (seen in training, held out for evaluation).
SYNONYMS: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    0: (("t-shirt", "tee", "t-shirt top", "short sleeve top", "tee shirt"), ("crew neck tee", "top")),
    1: (("trousers", "pants", "pair of trousers", "slacks", "jeans"), ("pair of pants", "chinos")),
    2: (("pullover", "sweater", "jumper", "knit sweater", "long sleeve pullover"), ("woolly jumper", "knitwear")),
    3: (("dress", "gown", "summer dress", "frock", "long dress"), ("evening dress", "sundress")),
    4: (("coat", "jacket", "winter coat", "overcoat", "parka"), ("trench coat", "anorak")),
    5: (("sandal", "sandals", "flip flop", "open toe shoe", "strappy sandal"), ("beach sandal", "slipper")),
    6: (("shirt", "button-up shirt", "collared shirt", "blouse", "dress shirt"), ("button-down shirt", "flannel shirt")),
    7: (("sneaker", "sneakers", "running shoe", "trainer", "sports shoe"), ("pair of running shoes", "athletic shoe")),
    8: (("bag", "handbag", "purse", "tote bag", "shoulder bag"), ("backpack", "satchel")),
    9: (("ankle boot", "boot", "boots", "leather boot", "chelsea boot"), ("short boot", "hiking boot")),
}

# Calibration wording: neither trained on nor evaluated on.
CALIB_SYNONYMS: dict[int, tuple[str, ...]] = {
    0: ("graphic tee", "cotton t-shirt", "v-neck tee"), 1: ("denim jeans", "cargo pants", "sweatpants"),
    2: ("wool sweater", "turtleneck sweater", "crewneck jumper"), 3: ("cocktail dress", "maxi dress", "party dress"),
    4: ("raincoat", "puffer jacket", "wool coat"), 5: ("summer sandal", "leather sandals", "gladiator sandal"),
    6: ("oxford shirt", "work shirt", "plaid shirt"), 7: ("canvas sneaker", "tennis shoe", "gym shoe"),
    8: ("leather handbag", "clutch bag", "messenger bag"), 9: ("suede ankle boot", "heeled boot", "winter boot"),
}
CALIB_TEMPLATES: tuple[str, ...] = (
    "a studio photo of a {}", "a {} for sale", "there is a {} in this photo", "a {} seen from the front",
)

TRAIN_TEMPLATES: tuple[str, ...] = (
    "{}", "a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "a black and white photo of a {}",
    "a product photo of a {}", "a grayscale image of a {}", "a small photo of the {}", "a {} on a dark background",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a catalogue shot of a {}", "my favourite {}", "a low resolution picture of a {}", "a close-up of the {}",
)

# Extra sentence frames for the tiny CLIP (the JAQ scorer) only, never for the denoisers: session 7's proposed
# remedy for TC's template dependence (``train_clip --wording scorer``). Tested in session 8 and not shipped: it made
# TC track held-out FD worse (benchmarks/scorer_probe.json). Disjoint from the calib and heldout frames
# (tests/test_testbed_scorers.py checks it); used with the training synonyms only.
SCORER_TEMPLATES: tuple[str, ...] = (
    "a photograph of a {}", "a clean photo of a {}", "a cropped photo of a {}", "a centered photo of a {}",
    "a plain {}", "one {}", "the {}", "a single {}", "an example of a {}", "a typical {}", "a simple {}",
    "a women's {}", "a men's {}", "a kid's {}", "a new {}", "a used {}", "a dark {}", "a light {}", "a {} item",
    "a {} on white", "a {} in grayscale", "a monochrome photo of a {}", "a tiny picture of a {}",
    "a low contrast photo of a {}", "a {} shown alone", "a photo showing a {}", "this is a {}", "here is a {}",
    "look at this {}", "I bought a {}", "a store photo of a {}", "an advert for a {}", "a sketch of a {}",
    "a rendering of a {}", "a {} against a black background", "a {} in the middle of the frame", "a nice {}",
    "a stylish {}", "a casual {}", "a classic {}", "a vintage {}", "a {} made of fabric", "a {} for everyday wear",
    "a {} in a wardrobe", "a picture with a {}", "product: {}", "a {}, side view", "a photo of my {}",
    "a photo of the {}", "a picture of one {}", "an image showing the {}", "a gray {}", "a black {}", "a white {}",
)

# Quality words for the tiny CLIP's image-quality training (a CLIP-IQA style antonym pair uses the first two).
GOOD_QUALITY = ("a good photo", "a sharp clean photo", "a high quality photo", "a clear picture")
BAD_QUALITY = ("a bad photo", "a noisy blurry photo", "a low quality photo", "a corrupted picture")


def captions_for(label: int, split: str = "train") -> list[str]:
    """All captions of one class for ``split`` ("train", "calib", "heldout", or "scorer": the training synonyms in
    the training and the extra scorer frames, for the tiny CLIP)."""
    syn_train, syn_held = SYNONYMS[label]
    if split == "train":
        syns, temps = syn_train, TRAIN_TEMPLATES
    elif split == "scorer":
        syns, temps = syn_train, TRAIN_TEMPLATES + SCORER_TEMPLATES
    elif split == "calib":
        syns, temps = CALIB_SYNONYMS[label], CALIB_TEMPLATES
    elif split == "heldout":
        syns, temps = syn_held, HELDOUT_TEMPLATES
    else:
        raise ValueError(f"split must be 'train', 'calib', 'heldout' or 'scorer', got {split!r}")
    return [t.format(s) for t in temps for s in syns]


def all_captions(split: str = "train") -> tuple[list[str], list[int]]:
    """Every caption of ``split`` with its class label."""
    caps: list[str] = []
    labels: list[int] = []
    for c in range(len(CLASS_NAMES)):
        cs = captions_for(c, split)
        caps += cs
        labels += [c] * len(cs)
    return caps, labels


def heldout_prompts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` held-out prompts with labels, classes balanced (round robin), deterministic for ``seed``."""
    rng = random.Random(seed)
    per_class = {c: captions_for(c, "heldout") for c in range(len(CLASS_NAMES))}
    for c in per_class:
        rng.shuffle(per_class[c])
    prompts, labels = [], []
    for i in range(n):
        c = i % len(CLASS_NAMES)
        prompts.append(per_class[c][(i // len(CLASS_NAMES)) % len(per_class[c])])
        labels.append(c)
    return prompts, labels


def data_dir() -> Path:
    """Where the Fashion-MNIST idx files live (``$QSCHED_FASHION_MNIST`` overrides the Debian path)."""
    d = Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))
    if not (d / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {d}. Install it with `apt-get install dataset-fashion-mnist` "
            f"or point ${DATA_DIR_ENV} at a folder holding the four *-ubyte.gz files."
        )
    return d


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@dataclass
class FashionMNIST:
    """Images as float tensor (N, 1, 32, 32) in [0, 1] (zero-padded from 28x28) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


def load_fashion_mnist(split: str = "train", limit: int | None = None) -> FashionMNIST:
    """Load the ``train`` (60k) or ``test`` (10k) split, padded to 32x32."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = data_dir()
    imgs = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz", 8)
    if limit is not None:
        imgs, labels = imgs[:limit], labels[:limit]
    x = torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return FashionMNIST(x, torch.from_numpy(labels.astype(np.int64)))
