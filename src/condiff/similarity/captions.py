"""Captions for text alignment: class names x synonyms x templates.

The image side of text guidance (proj(E1(x_t, t)), eq 15) is trained to align with
the embeddings of these captions.  Varied templates and synonyms make it align
with the *region* of text space that describes a class rather than with one
string, so free-form prompts that were never seen ("something to wear on your
feet") still land near the right images.

:data:`HELD_OUT_PROMPTS` are paraphrases kept out of the training captions (a test
checks it); the benchmark scores text guidance on them.
"""

from __future__ import annotations

__all__ = ["SYNONYMS", "TEMPLATES", "HELD_OUT_PROMPTS", "class_phrases", "captions", "training_captions"]

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
