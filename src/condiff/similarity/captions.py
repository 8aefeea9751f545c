"""Captions for text alignment (class names x synonyms x templates), and the geometry built on them.

The image side of text guidance (proj(E1(x_t, t)), eq 15) is trained to align with
the embeddings of these captions.  Varied templates and synonyms make it align
with the *region* of text space that describes a class rather than with one
string.

A prompt that was never seen ("something to wear on your feet") is mapped onto that
region by :func:`caption_prior` before the cosine of eq 15 is taken: the image side
only learned the directions of the caption classes, so the prompt's target is the
mixture of those directions that the text encoder itself ranks nearest (the role
of unCLIP's prior, without training one).  The text embeddings are first
centred on the caption bank's mean (:func:`centre`): all captions share a large
"a photo of clothing" component, and removing it spreads the class directions apart.

:data:`HELD_OUT_PROMPTS` are paraphrases kept out of the training captions (a test
checks it); the benchmark scores text guidance on them.  :data:`FRESH_PROMPTS` were
written after :func:`caption_prior` and its temperature were chosen on the first
list, as a check that the choice did not fit those prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SYNONYMS", "TEMPLATES", "HELD_OUT_PROMPTS", "FRESH_PROMPTS", "class_phrases", "captions", "training_captions",
           "centre", "class_centroids", "caption_class_logits", "caption_prior"]

# Fashion-MNIST classes -> noun phrases (with their article) a person might use
SYNONYMS = {
    "T-shirt/top": ["a t-shirt", "a tee", "a top", "a short-sleeved shirt", "a tank top"],
    "Trouser": ["a pair of trousers", "pants", "jeans", "slacks"],
    "Pullover": ["a pullover", "a sweater", "a jumper", "a long-sleeved sweater"],
    "Dress": ["a dress", "a gown", "a frock", "a sundress"],
    "Coat": ["a coat", "a jacket", "an overcoat", "a parka"],
    "Sandal": ["a sandal", "sandals", "a flip-flop", "an open-toed shoe"],
    "Shirt": ["a shirt", "a button-up shirt", "a blouse", "a collared shirt"],
    "Sneaker": ["a sneaker", "a trainer", "a running shoe", "an athletic shoe"],
    "Bag": ["a bag", "a handbag", "a purse", "a tote bag"],
    "Ankle boot": ["an ankle boot", "a boot", "a short boot", "a bootie"],
}

TEMPLATES = [
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a grayscale photo of {}",
    "a black and white picture of {}",
    "a low-resolution image of {}",
    "a small photo of {}",
    "a product photo of {}",
    "a centered image of {}",
    "a drawing of {}",
    "a catalogue picture of {}",
]

# (prompt, accepted class names): paraphrases that are NOT training captions
HELD_OUT_PROMPTS = [
    ("a plain cotton tee to wear in summer", ["T-shirt/top"]),
    ("long pants with two legs", ["Trouser"]),
    ("blue denim for everyday wear", ["Trouser"]),
    ("a cosy knitted sweater for cold days", ["Pullover"]),
    ("an elegant one-piece outfit for a party", ["Dress"]),
    ("heavy outerwear for rain and snow", ["Coat"]),
    ("open shoes with straps for the beach", ["Sandal"]),
    ("a formal top with buttons down the front", ["Shirt"]),
    ("shoes for jogging and the gym", ["Sneaker"]),
    ("something to carry your belongings in", ["Bag"]),
    ("a leather boot that reaches just above the ankle", ["Ankle boot"]),
    ("something to wear on your feet", ["Sandal", "Sneaker", "Ankle boot"]),
    ("a warm top for winter", ["Pullover", "Coat"]),
]

FRESH_PROMPTS = [
    ("a top you would wear to the gym in July", ["T-shirt/top"]),
    ("legwear for the office", ["Trouser"]),
    ("a thick knit to keep warm by the fire", ["Pullover"]),
    ("a flowing garment for a summer wedding", ["Dress"]),
    ("something to put on before going out in a storm", ["Coat"]),
    ("footwear that leaves your toes uncovered", ["Sandal"]),
    ("a top with a collar and cuffs for the office", ["Shirt"]),
    ("comfortable shoes with rubber soles for sport", ["Sneaker"]),
    ("an accessory with a handle for carrying things", ["Bag"]),
    ("footwear that covers the ankle", ["Ankle boot"]),
]


def class_phrases(name: str) -> list[str]:
    """Noun phrases for a class: its synonyms when known, else the class name itself."""
    for key, phrases in SYNONYMS.items():
        if key.lower() == name.lower():
            return list(phrases)
    plain = name.replace("_", " ").replace("/", " or ").strip().lower()
    return [plain, f"a {plain}"]


def captions(name: str) -> list[str]:
    """Every template filled with every phrase of one class, without repeats."""
    out = [tpl.format(p) for p in class_phrases(name) for tpl in TEMPLATES]
    return list(dict.fromkeys(out))


def training_captions(class_names: list[str]) -> tuple[list[str], list[int]]:
    """All captions of all classes and their class indices (caption i describes class labels[i])."""
    texts, labels = [], []
    for k, name in enumerate(class_names):
        c = captions(name)
        texts += c
        labels += [k] * len(c)
    return texts, labels


def centre(e: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Text embeddings moved to the caption bank's centre and renormalised: (e - mean) / |e - mean|."""
    e = e.float()
    return F.normalize(e if mean is None else e - mean.to(e.device, e.dtype), dim=-1)


def class_centroids(bank: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, D) unit mean direction of each class's captions (the alignment target of every image of it)."""
    sums = torch.zeros(num_classes, bank.shape[1], device=bank.device).index_add_(0, labels.to(bank.device),
                                                                                  bank.float())
    return F.normalize(sums, dim=-1)


def caption_class_logits(z: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         tau: float) -> torch.Tensor:
    """(B, K) log mean_{captions c of class k} exp(cos(z, c) / tau): how well each class's captions describe z."""
    s = F.normalize(z.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).to(z.device).T / tau    # (B, M)
    lab = labels.to(z.device)
    other = lab[None, :] != torch.arange(num_classes, device=z.device)[:, None]                   # (K, M)
    counts = torch.bincount(lab, minlength=num_classes).float()
    return torch.logsumexp(s[:, None, :].masked_fill(other[None], float("-inf")), dim=-1) - counts.log()


def caption_prior(emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, temperature: float,
                  tau: float = 0.07) -> torch.Tensor:
    """A prompt's target in the space the image side was aligned with: sum_k w_k c_k, renormalised.

    w = softmax_k(caption_class_logits(E_text(prompt)) / temperature) ranks the classes by the
    text encoder's own similarities to their training captions (raw, uncentred embeddings), and
    c_k are the centred class directions of :func:`class_centroids` that the alignment loss put
    every image of class k on.  A small temperature picks the best class; a large one blends.

    Args:
        emb: raw unit text embeddings of the prompts, (B, D).
        bank, labels: raw unit caption embeddings (M, D) and their classes (M,).
    """
    if not temperature > 0:
        raise ValueError("the prior's temperature must be > 0")
    k = int(labels.max()) + 1
    w = torch.softmax(caption_class_logits(emb, bank, labels, k, tau) / temperature, dim=-1)
    cents = class_centroids(centre(bank, bank.mean(0)), labels, k).to(w.device)
    return F.normalize(w @ cents, dim=-1)
