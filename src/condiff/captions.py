"""Captions that say more than the class: pixel attributes, caption splits, and their text embeddings.

Fashion-MNIST has no captions, so condiff derives three attributes from the pixels of each
image, by one documented rule (:func:`attribute_values`, on images in [0, 1]; a [-1, 1] batch
is mapped there first with ``low=-1``):

* **brightness** (dark / light): mean intensity of the foreground pixels, those above
  :data:`FOREGROUND` (the background of Fashion-MNIST is black);
* **texture** (plain / patterned): high-frequency energy, the mean |x - mean of its 4
  neighbours| (a discrete Laplacian) over the *interior* foreground pixels (a pixel whose 4
  neighbours are foreground too), so the outline of the garment does not count as a pattern;
* **shape** (slim / wide): the foreground's mean width, foreground pixels per occupied row
  over the image width.

Each value is thresholded at its class's median over the training set (:meth:`AttributeRule.fit`),
so both words occur for every class, about half and half; the thresholds are stored with a
model (:meth:`AttributeRule.config`) so that the same rule scores its samples later.  The rule
is not used where it means nothing (:data:`NOT_APPLICABLE`): texture for sandals (their straps
and gaps are the outline: fewer than half their foreground pixels are interior) and shape for
the three kinds of footwear (every shoe is shown in profile across the whole image, so its row
width measures the outline of an open or closed shoe, not a slim or wide cut).  Captions never
mention an attribute where it does not apply, and scores skip it.

Captions compose a class noun, attribute words and a template ("a dark patterned dress",
"a light, plain pair of trousers", "a photo of a wide jacket").  Nouns, words and templates
come in two disjoint splits: ``"train"`` (what models are trained on) and ``"heldout"``
(phrasings and synonyms that never appear in training, for scoring; a test checks that no
held-out noun, word or template occurs in any training caption).  :func:`caption_table` lists
every training caption that is true of an image with a given class and attributes;
:class:`CaptionBank` embeds the finite caption set once with MiniLM and caches it keyed by
caption, so training never runs the text encoder.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import CondiffError

__all__ = ["ATTRIBUTES", "FOREGROUND", "NOT_APPLICABLE", "NOUNS", "WORDS", "TEMPLATES", "SPLITS", "RICH_NOUNS",
           "RICH_WORDS", "RICH_TEMPLATES", "VOCABULARIES", "CAPTION_SETS", "RICH_PER_PATTERN", "RICH_PER_COMBO", "Caption",
           "attribute_values", "AttributeRule", "applicable", "attribute_codes", "decode_codes", "make_caption",
           "split_captions", "caption_table", "heldout_prompts", "CaptionBank", "attribute_combos", "combo_labels",
           "combo_captions"]

#: The attributes, in the order of every (N, A) tensor; value 0 is the first word, 1 the second.
ATTRIBUTES = ("brightness", "texture", "shape")
#: Pixels above this level (in [0, 1]) are foreground.
FOREGROUND = 0.1
#: class name -> attributes that the rule cannot judge for it (module docstring).
NOT_APPLICABLE = {"Sandal": ("texture", "shape"), "Sneaker": ("shape",), "Ankle boot": ("shape",)}
SPLITS = ("train", "heldout")

# class -> split -> (article, noun); article "" for plurals
NOUNS = {
    "T-shirt/top": {"train": [("a", "t-shirt"), ("a", "tee"), ("a", "top")],
                    "heldout": [("a", "short-sleeved top"), ("a", "tank top")]},
    "Trouser": {"train": [("a", "pair of trousers"), ("", "pants"), ("", "trousers")],
                "heldout": [("", "jeans"), ("", "slacks")]},
    "Pullover": {"train": [("a", "pullover"), ("a", "sweater"), ("a", "jumper")],
                 "heldout": [("a", "jersey"), ("a", "cardigan")]},
    "Dress": {"train": [("a", "dress"), ("a", "frock"), ("a", "gown")],
              "heldout": [("a", "sundress"), ("a", "cocktail dress")]},
    "Coat": {"train": [("a", "coat"), ("a", "jacket"), ("an", "overcoat")],
             "heldout": [("a", "parka"), ("a", "raincoat")]},
    "Sandal": {"train": [("a", "sandal"), ("a", "pair of sandals"), ("a", "flip-flop")],
               "heldout": [("an", "open-toed shoe"), ("a", "strappy shoe")]},
    "Shirt": {"train": [("a", "shirt"), ("a", "blouse"), ("a", "button-up shirt")],
              "heldout": [("a", "collared shirt"), ("a", "button-down")]},
    "Sneaker": {"train": [("a", "sneaker"), ("a", "trainer"), ("a", "running shoe")],
                "heldout": [("an", "athletic shoe"), ("a", "gym shoe")]},
    "Bag": {"train": [("a", "bag"), ("a", "handbag"), ("a", "purse")],
            "heldout": [("a", "tote bag"), ("a", "satchel")]},
    "Ankle boot": {"train": [("an", "ankle boot"), ("a", "boot"), ("a", "bootie")],
                   "heldout": [("a", "short boot"), ("a", "chelsea boot")]},
}

# attribute -> split -> (words for value 0, words for value 1)
WORDS = {
    "brightness": {"train": (("dark", "dark-coloured"), ("light", "light-coloured")),
                   "heldout": (("black", "dim"), ("white", "pale"))},
    "texture": {"train": (("plain", "solid"), ("patterned", "textured")),
                "heldout": (("simple", "unadorned"), ("printed", "decorated"))},
    "shape": {"train": (("slim", "narrow"), ("wide", "broad")),
              "heldout": (("thin", "skinny"), ("loose", "baggy"))},
}
#: More training vocabulary (issue 20): further nouns, words and templates for the ``"rich"`` vocabulary, so that
#: a caption projection learns a direction per attribute rather than two words.  None of them shares a word (split at
#: hyphens, as MiniLM's tokenizer splits them) with the held-out split, which stays the same in both vocabularies.
RICH_NOUNS = {
    "T-shirt/top": ["crew-neck tee", "camisole", "vest top", "polo top", "tshirt", "short-sleeve tee"],
    "Trouser": ["chinos", "leggings", "joggers", "sweatpants", "culottes", "pair of pants"],
    "Pullover": ["knit sweater", "sweatshirt", "hoodie", "turtleneck", "wool jumper", "long-sleeved sweater"],
    "Dress": ["maxi dress", "shift dress", "evening dress", "midi dress", "summer dress", "party dress"],
    "Coat": ["trench coat", "anorak", "blazer", "windbreaker", "winter coat", "rain jacket"],
    "Sandal": ["gladiator sandal", "thong sandal", "beach sandal", "slide sandal", "summer sandal", "strappy sandal"],
    "Shirt": ["dress shirt", "flannel shirt", "oxford shirt", "tunic", "long-sleeved shirt", "work shirt"],
    "Sneaker": ["tennis shoe", "sports shoe", "canvas shoe", "jogging shoe", "low-top sneaker", "basketball shoe"],
    "Bag": ["shoulder bag", "clutch", "backpack", "messenger bag", "leather bag", "carrier bag"],
    "Ankle boot": ["heeled boot", "combat boot", "desert boot", "leather boot", "winter boot", "lace-up boot"],
}
RICH_WORDS = {
    "brightness": (("charcoal", "navy", "deep-toned", "shadowy", "dark grey", "midnight-blue", "inky", "murky",
                    "sombre", "dusky", "ebony", "coal-coloured"),
                   ("bright", "cream", "ivory", "pastel", "light grey", "beige", "faded", "luminous", "milky",
                    "bleached", "silvery", "chalky")),
    "texture": (("unpatterned", "smooth", "single-colour", "uniform", "minimalist", "bare", "clean", "flat",
                 "featureless", "unembellished", "monochrome", "basic", "understated", "block-coloured"),
                ("striped", "checked", "embroidered", "ornate", "busy", "detailed", "graphic", "floral", "speckled",
                 "mottled", "dotted", "plaid", "knitted", "paisley")),
    "shape": (("slender", "fitted", "tight", "tight-fitting", "lean", "close-fitting", "svelte", "compact",
               "streamlined", "trim", "form-fitting", "petite", "tapered", "skin-tight"),
              ("oversized", "roomy", "boxy", "flared", "voluminous", "relaxed", "full", "ample", "chunky", "bulky",
               "generous", "billowy", "spacious", "big")),
}
RICH_TEMPLATES = ["a picture of {np}", "a product photo of {np}", "a sketch of {np}", "{np}, front view",
                  "this is {np}", "a close-up of {np}", "{bare} which is {adjs}", "a small photo of {np}",
                  "a studio photo of {np}"]
#: Training vocabularies: ``basic`` (NOUNS, WORDS, TEMPLATES' train split, every caption enumerated) and ``rich``
#: (``basic``'s captions plus :data:`RICH_PER_PATTERN` sampled captions per class and attribute pattern over the
#: union with the RICH_* lists, seeded).
VOCABULARIES = ("basic", "rich")
#: vocabulary -> the caption-set name a model's config stores ("captions" of a text model, "caption_set" of an encoder)
CAPTION_SETS = {"basic": "attributes", "rich": "attributes-rich"}
RICH_PER_PATTERN = 48
#: Rich captions per (class, attributes) combination added to the caption bank of :func:`combo_captions`.
RICH_PER_COMBO = 24
_PLURAL = {"pants", "trousers", "jeans", "slacks", "chinos", "leggings", "joggers", "sweatpants", "culottes"}
_PRENOMINAL = ("shape", "brightness", "texture")  # English adjective order: size/shape, colour, pattern

# split -> templates; {np}: article + adjectives + noun; {bare}: article + noun; {adjs}: "dark and patterned".
# A template with {adjs} is used only when the caption mentions an attribute.
TEMPLATES = {
    "train": ["{np}", "{np_comma}", "a photo of {np}", "{bare} that is {adjs}"],
    "heldout": ["an image showing {np}", "{bare}, {adjs}", "a catalogue shot of {np_comma}"],
}


def _unit(images: torch.Tensor, low: float) -> torch.Tensor:
    if low not in (-1.0, 0.0):
        raise CondiffError(f"images must be in [-1, 1] (low=-1) or [0, 1] (low=0), got low={low}")
    x = images.float()
    x = (x + 1) / 2 if low == -1.0 else x
    if x.dim() != 4:
        raise CondiffError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    return x.mean(1, keepdim=True).clamp(0, 1)  # colour images: their grey level


def attribute_values(images: torch.Tensor, low: float = -1.0) -> torch.Tensor:
    """(N, A) raw attribute values of a batch (N, C, H, W): brightness, texture, shape (module docstring).

    Args:
        images: pixels in [-1, 1] (``low=-1``, the default, condiff's data range) or in [0, 1] (``low=0``).
    """
    x = _unit(images, low)
    W = x.shape[-1]
    fg = x > FOREGROUND
    fgf = fg.float()
    area = fgf.flatten(1).sum(1)
    brightness = (x * fgf).flatten(1).sum(1) / area.clamp_min(1)
    p = F.pad(fgf, (1, 1, 1, 1))
    interior = p[..., 1:-1, 1:-1] * p[..., :-2, 1:-1] * p[..., 2:, 1:-1] * p[..., 1:-1, :-2] * p[..., 1:-1, 2:]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    lap = x - 0.25 * (xp[..., :-2, 1:-1] + xp[..., 2:, 1:-1] + xp[..., 1:-1, :-2] + xp[..., 1:-1, 2:])
    texture = (lap.abs() * interior).flatten(1).sum(1) / interior.flatten(1).sum(1).clamp_min(1)
    rows = fg.any(-1).flatten(1).float().sum(1)
    shape = area / rows.clamp_min(1) / W
    return torch.stack([brightness, texture, shape], dim=1)


def applicable(class_names: Sequence[str]) -> torch.Tensor:
    """(K, A) bool: whether attribute a applies to class k (:data:`NOT_APPLICABLE`)."""
    return torch.tensor([[a not in NOT_APPLICABLE.get(name, ()) for a in ATTRIBUTES] for name in class_names])


@dataclass
class AttributeRule:
    """The attribute rule with its thresholds: value > thresholds[k, a] means word 1 (light, patterned, wide).

    Args:
        thresholds: (K, A) per-class medians of :func:`attribute_values` over the training set.
        class_names: the K classes.
    """

    thresholds: torch.Tensor
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.thresholds = torch.as_tensor(self.thresholds, dtype=torch.float32)
        if self.thresholds.dim() != 2 or self.thresholds.shape[1] != len(ATTRIBUTES) \
                or len(self.class_names) != self.thresholds.shape[0] or not torch.isfinite(self.thresholds).all():
            raise CondiffError(f"an attribute rule needs finite (K, {len(ATTRIBUTES)}) thresholds for its K class "
                               f"names, got {tuple(self.thresholds.shape)} for {len(self.class_names)}")

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], low: float = -1.0,
            batch: int = 10_000) -> "AttributeRule":
        """Thresholds at each class's median over ``images`` (the training set), so both values exist per class."""
        v = torch.cat([attribute_values(images[i:i + batch], low) for i in range(0, len(images), batch)])
        th = []
        for k, name in enumerate(class_names):
            m = labels == k
            if not bool(m.any()):
                raise CondiffError(f"no training image of class {name!r}: cannot fit its attribute thresholds")
            th.append(torch.quantile(v[m], 0.5, dim=0))
        return cls(torch.stack(th), list(class_names))

    def attributes(self, images: torch.Tensor, labels: torch.Tensor, low: float = -1.0) -> torch.Tensor:
        """(N, A) long in {0, 1}: each image's attributes judged against its class's thresholds."""
        labels = torch.as_tensor(labels).long().cpu()
        return (attribute_values(images, low).cpu() > self.thresholds[labels]).long()

    def applicable(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, A) bool: whether each attribute applies to each row's class."""
        return applicable(self.class_names)[torch.as_tensor(labels).long().cpu()]

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                 low: float = -1.0) -> dict:
        """Per attribute: the share of rows whose judged value equals ``targets`` (N, A; -1 = not asked),
        over the rows that ask it and whose class it applies to; None where no row does."""
        got = self.attributes(images, labels, low)
        targets = torch.as_tensor(targets).long().cpu()
        asked = (targets >= 0) & self.applicable(labels)
        return {a: (float((got[:, i] == targets[:, i])[asked[:, i]].float().mean()) if bool(asked[:, i].any())
                    else None) for i, a in enumerate(ATTRIBUTES)}

    def config(self) -> dict:
        return {"attributes": list(ATTRIBUTES), "foreground": FOREGROUND, "class_names": list(self.class_names),
                "thresholds": self.thresholds.tolist()}  # float32 values: exact in JSON

    @classmethod
    def from_config(cls, config: dict) -> "AttributeRule":
        if not isinstance(config, dict) or config.get("attributes") != list(ATTRIBUTES) \
                or config.get("foreground") != FOREGROUND:
            raise CondiffError(f"an attribute rule config must have attributes {list(ATTRIBUTES)} and foreground "
                               f"{FOREGROUND}; this one comes from another rule")
        try:
            return cls(torch.tensor(config["thresholds"], dtype=torch.float32), list(config["class_names"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CondiffError(f"invalid attribute rule config: {e}") from None


def attribute_codes(labels: torch.Tensor, attrs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) one integer per (class, attributes): label + K * sum_a attrs[:, a] 2^a (the dataset's labels)."""
    bits = (torch.as_tensor(attrs).long() << torch.arange(len(ATTRIBUTES))).sum(1)
    return torch.as_tensor(labels).long() + num_classes * bits


def decode_codes(codes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`attribute_codes`: (labels (N,), attrs (N, A))."""
    codes = torch.as_tensor(codes).long()
    bits = codes // num_classes
    return codes % num_classes, (bits[:, None] >> torch.arange(len(ATTRIBUTES))) & 1


@dataclass(frozen=True)
class Caption:
    """A caption, its class index, and the attribute values it states (A,): 0, 1, or -1 (not mentioned)."""

    text: str
    label: int
    attrs: tuple[int, ...]


def _article(article: str, first_word: str) -> str:
    if not article:
        return ""
    return ("an " if first_word[:1].lower() in "aeiou" else "a ") if article in ("a", "an") else article + " "


def make_caption(article: str, noun: str, words: dict[str, str], template: str) -> str:
    """One caption: ``words`` maps attribute -> its word (mentioned attributes only)."""
    adjs = [words[a] for a in _PRENOMINAL if a in words]
    np_ = _article(article, (adjs or [noun])[0]) + " ".join(adjs + [noun])
    np_comma = _article(article, (adjs or [noun])[0]) + ", ".join(adjs) + (" " if adjs else "") + noun
    listed = " and ".join([", ".join(adjs[:-1]), adjs[-1]] if len(adjs) > 1 else adjs)
    return template.format(np=np_, np_comma=np_comma, bare=_article(article, noun) + noun, adjs=listed)


def _nouns(name: str, split: str) -> list[tuple[str, str]]:
    if name not in NOUNS:
        raise CondiffError(f"no caption nouns for class {name!r}: attribute captions know the Fashion-MNIST classes "
                           f"({', '.join(NOUNS)})")
    return NOUNS[name][split]


def split_captions(class_names: Sequence[str], split: str = "train", vocabulary: str = "basic") -> list[Caption]:
    """Every caption of a split: each noun x template x (per applicable attribute: unmentioned, or either
    value with either word); no repeats.  Deterministic order.

    ``vocabulary="rich"`` (training split only) adds :data:`RICH_PER_PATTERN` captions per class and attribute
    pattern (each attribute unmentioned, 0 or 1), drawn with a fixed seed from the basic and the RICH_* nouns,
    words and templates together (:data:`VOCABULARIES`); the basic captions come first, unchanged."""
    if split not in SPLITS:
        raise CondiffError(f"caption split must be one of {', '.join(SPLITS)}, got {split!r}")
    if vocabulary not in VOCABULARIES:
        raise CondiffError(f"caption vocabulary must be one of {', '.join(VOCABULARIES)}, got {vocabulary!r}")
    if vocabulary == "rich" and split != "train":
        raise CondiffError("the rich vocabulary is a training vocabulary: the held-out split has one")
    out, seen = [], set()
    for k, name in enumerate(class_names):
        usable = [a for a in ATTRIBUTES if a not in NOT_APPLICABLE.get(name, ())]
        choices = [[(None, None)] + [(v, w) for v in (0, 1) for w in WORDS[a][split][v]] for a in usable]
        for article, noun in _nouns(name, split):
            for combo in itertools.product(*choices):
                words = {a: w for a, (v, w) in zip(usable, combo) if v is not None}
                values = {a: v for a, (v, w) in zip(usable, combo) if v is not None}
                attrs = tuple(values.get(a, -1) for a in ATTRIBUTES)
                for template in TEMPLATES[split]:
                    if "{adjs}" in template and not words:
                        continue
                    text = make_caption(article, noun, words, template)
                    if text not in seen:
                        seen.add(text)
                        out.append(Caption(text, k, attrs))
    if vocabulary == "rich":
        out += [c for c in _rich_captions(class_names) if c.text not in seen and not seen.add(c.text)]
    return out


def _rich_captions(class_names: Sequence[str]) -> list[Caption]:
    import random

    rng = random.Random(20)  # the vocabulary's seed: a fixed caption set, so its embeddings cache by caption
    words = {a: [WORDS[a]["train"][v] + RICH_WORDS[a][v] for v in (0, 1)] for a in ATTRIBUTES}
    templates = TEMPLATES["train"] + RICH_TEMPLATES
    out = []
    for k, name in enumerate(class_names):
        nouns = _nouns(name, "train") + [("" if n in _PLURAL else "a", n) for n in RICH_NOUNS.get(name, [])]
        usable = [a for a in ATTRIBUTES if a not in NOT_APPLICABLE.get(name, ())]
        for pattern in itertools.product((None, 0, 1), repeat=len(usable)):
            stated = {a: v for a, v in zip(usable, pattern) if v is not None}
            attrs = tuple(stated.get(a, -1) for a in ATTRIBUTES)
            usable_templates = [t for t in templates if stated or "{adjs}" not in t]
            for _ in range(RICH_PER_PATTERN):
                article, noun = rng.choice(nouns)
                chosen = {a: rng.choice(words[a][v]) for a, v in stated.items()}
                out.append(Caption(make_caption(article, noun, chosen, rng.choice(usable_templates)), k, attrs))
    return out


def caption_table(captions: Sequence[Caption], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table (K 2^A, L) long padded with -1, counts (K 2^A,)): row c lists the captions true of an image
    with code c (:func:`attribute_codes`): its class, and every attribute it mentions equal to the image's."""
    rows = []
    for code in range(num_classes * 2 ** len(ATTRIBUTES)):
        k, attrs = code % num_classes, [(code // num_classes >> a) & 1 for a in range(len(ATTRIBUTES))]
        rows.append([i for i, c in enumerate(captions)
                     if c.label == k and all(v in (-1, attrs[a]) for a, v in enumerate(c.attrs))])
    counts = torch.tensor([len(r) for r in rows])
    table = torch.full((len(rows), max(int(counts.max()), 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        table[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return table, counts


def attribute_combos(class_names: Sequence[str]) -> list[tuple[int, tuple[int, ...]]]:
    """Every (class, attributes) a caption can state in full: the applicable attributes 0 or 1, the others -1.
    The order of :func:`heldout_prompts` (one prompt per combination)."""
    out = []
    for k, name in enumerate(class_names):
        usable = [a for a in ATTRIBUTES if a not in NOT_APPLICABLE.get(name, ())]
        for values in itertools.product((0, 1), repeat=len(usable)):
            given = dict(zip(usable, values))
            out.append((k, tuple(given.get(a, -1) for a in ATTRIBUTES)))
    return out


def combo_labels(labels: torch.Tensor, attrs: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """(N,) the index in :func:`attribute_combos` of each image's class and (applicable) attributes."""
    index = {c: i for i, c in enumerate(attribute_combos(class_names))}
    ok = applicable(class_names)
    return torch.tensor([index[(k, tuple(int(v) if ok[k, a] else -1 for a, v in enumerate(row)))]
                         for k, row in zip(torch.as_tensor(labels).tolist(), torch.as_tensor(attrs).tolist())])


def combo_captions(class_names: Sequence[str], split: str = "train",
                   vocabulary: str = "basic") -> tuple[list[str], list[int]]:
    """Captions stating a class and all its applicable attributes, and their :func:`attribute_combos` index:
    every noun x every word choice of the split, in its first template (a compact caption bank to store).

    ``vocabulary="rich"`` adds the first :data:`RICH_PER_COMBO` rich training captions (:func:`split_captions`) that
    state each combination in full."""
    texts, labels = [], []
    for i, (k, attrs) in enumerate(attribute_combos(class_names)):
        stated = [(a, v) for a, v in zip(ATTRIBUTES, attrs) if v >= 0]
        for article, noun in _nouns(class_names[k], split):
            for choice in itertools.product((0, 1), repeat=len(stated)):
                words = {a: WORDS[a][split][v][c] for (a, v), c in zip(stated, choice)}
                texts.append(make_caption(article, noun, words, TEMPLATES[split][0]))
                labels.append(i)
    if vocabulary != "basic":
        index, ok = {c: i for i, c in enumerate(attribute_combos(class_names))}, applicable(class_names)
        seen, per = set(texts), [0] * len(index)
        for c in split_captions(class_names, split, vocabulary)[len(split_captions(class_names, split)):]:
            full = all((v >= 0) == bool(ok[c.label, a]) for a, v in enumerate(c.attrs))
            if full and c.text not in seen and per[index[(c.label, c.attrs)]] < RICH_PER_COMBO:
                seen.add(c.text)
                per[index[(c.label, c.attrs)]] += 1
                texts.append(c.text)
                labels.append(index[(c.label, c.attrs)])
    return texts, labels


def heldout_prompts(class_names: Sequence[str], split: str = "heldout") -> list[Caption]:
    """The scoring prompts: for each class, every combination of its applicable attributes, all stated, in a
    held-out phrasing (noun, words and template cycle through the held-out split).  Deterministic.

    ``split="train"``: the same combinations in training phrasings (each prompt is a training caption), to
    tell what a model learned from what its text encoder carries over to new words."""
    if split not in SPLITS:
        raise CondiffError(f"caption split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = []
    for k, name in enumerate(class_names):
        usable = [a for a in ATTRIBUTES if a not in NOT_APPLICABLE.get(name, ())]
        nouns = _nouns(name, split)
        for j, values in enumerate(itertools.product((0, 1), repeat=len(usable))):
            article, noun = nouns[j % len(nouns)]
            words = {a: WORDS[a][split][v][(j + i) % 2] for i, (a, v) in enumerate(zip(usable, values))}
            template = TEMPLATES[split][(j + k) % len(TEMPLATES[split])]
            attrs = dict(zip(usable, values))
            out.append(Caption(make_caption(article, noun, words, template), k,
                               tuple(attrs.get(a, -1) for a in ATTRIBUTES)))
    return out


class CaptionBank:
    """A finite caption set and its text embeddings (M, D), computed once and cached keyed by caption.

    ``CaptionBank.build(texts, encoder, cache=PATH)`` reuses PATH when it holds exactly these captions
    (and the encoder's name), else encodes them (``encoder.encode(list) -> (M, D)``) and writes PATH
    (safetensors: the embeddings, with the captions in its metadata).
    """

    def __init__(self, texts: Sequence[str], embeddings: torch.Tensor, model: str = ""):
        self.texts = list(texts)
        self.embeddings = torch.as_tensor(embeddings).float()
        self.model = model
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.texts):
            raise CondiffError(f"a caption bank needs one embedding row per caption, got "
                               f"{tuple(self.embeddings.shape)} for {len(self.texts)}")
        self.index = {t: i for i, t in enumerate(self.texts)}

    def __len__(self) -> int:
        return len(self.texts)

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) embeddings of captions of the bank; an unknown caption is an error."""
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise CondiffError(f"caption not in the bank: {missing[0]!r}")
        return self.embeddings[[self.index[t] for t in texts]]

    @classmethod
    def build(cls, texts: Sequence[str], encoder, cache: str | Path | None = None) -> "CaptionBank":
        texts = list(texts)
        model = str(getattr(encoder, "name", type(encoder).__name__))
        if cache is not None and Path(cache).is_file():
            bank = cls.load(cache)
            if bank.texts == texts and bank.model == model:
                return bank
        bank = cls(texts, torch.as_tensor(encoder.encode(texts)).float().cpu(), model)
        if cache is not None:
            bank.save(cache)
        return bank

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from .atomic import atomic_path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp),
                      metadata={"captions": json.dumps(self.texts), "model": self.model})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CaptionBank":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
            texts = json.loads(meta["captions"])
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise CondiffError(f"{path}: not a caption bank ({e})") from None
        return cls(texts, emb, meta.get("model", ""))
