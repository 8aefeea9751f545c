"""condiff.captions: the pixel attribute rule, caption splits, the caption table and bank."""

import re

import pytest
import torch

from condiff.captions import (ATTRIBUTES, NOT_APPLICABLE, NOUNS, RICH_NOUNS, RICH_PER_PATTERN, RICH_WORDS, TEMPLATES,
                              WORDS, AttributeRule, CaptionBank, attribute_codes, attribute_values, caption_table,
                              decode_codes, heldout_prompts, make_caption, split_captions)
from condiff.data import FASHION_MNIST_CLASSES
from condiff.errors import CondiffError

B, T, S = ATTRIBUTES.index("brightness"), ATTRIBUTES.index("texture"), ATTRIBUTES.index("shape")


def canvas(n=1):
    return torch.full((n, 1, 28, 28), -1.0)  # black background in [-1, 1]


def square(level, lo=6, hi=22, x0=6, x1=22):
    x = canvas()
    x[..., lo:hi, x0:x1] = level
    return x


def test_brightness_is_the_foreground_mean():
    dark, light = square(-0.2), square(0.9)  # 0.4 and 0.95 in [0, 1]
    v = attribute_values(torch.cat([dark, light]))
    assert v[0, B] == pytest.approx(0.4, abs=1e-6) and v[1, B] == pytest.approx(0.95, abs=1e-6)
    # the same images in [0, 1] give the same values
    assert torch.allclose(attribute_values((torch.cat([dark, light]) + 1) / 2, low=0.0), v)
    # the background does not count: a larger dark square has the same brightness
    assert attribute_values(square(-0.2, 2, 26, 2, 26))[0, B] == pytest.approx(0.4, abs=1e-6)


def test_texture_sees_stripes_not_the_outline():
    flat = square(0.6)
    striped = square(0.6)
    striped[..., 6:22:2, 6:22] = 0.0  # horizontal stripes inside the square
    v = attribute_values(torch.cat([flat, striped]))
    assert v[0, T] == pytest.approx(0.0, abs=1e-6)  # the flat square's edge is excluded (interior pixels only)
    assert v[1, T] > 0.1


def test_shape_is_the_mean_foreground_width():
    narrow, wide = square(0.6, 4, 24, 10, 17), square(0.6, 4, 24, 2, 26)
    v = attribute_values(torch.cat([narrow, wide]))
    assert v[0, S] == pytest.approx(7 / 28) and v[1, S] == pytest.approx(24 / 28)


def test_rule_thresholds_at_class_medians_and_judges_both_ways():
    levels = torch.linspace(-0.5, 0.9, 5)
    imgs = torch.cat([square(float(v)) for v in levels] * 2)
    labels = torch.tensor([0] * 5 + [1] * 5)
    rule = AttributeRule.fit(imgs, labels, ["Dress", "Coat"])
    assert rule.thresholds[0, B] == pytest.approx((float(levels[2]) + 1) / 2, abs=1e-6)
    a = rule.attributes(imgs, labels)
    assert a[:5, B].tolist() == [0, 0, 0, 1, 1]  # strictly above the median is "light"
    acc = rule.accuracy(imgs, labels, torch.stack([a[:, 0], a[:, 1], torch.full((10,), -1)], 1))
    assert acc["brightness"] == 1.0 and acc["shape"] is None
    again = AttributeRule.from_config(rule.config())
    assert torch.equal(again.thresholds, rule.thresholds) and again.class_names == rule.class_names
    with pytest.raises(CondiffError):
        AttributeRule.from_config(dict(rule.config(), foreground=0.5))


def test_codes_round_trip():
    labels, attrs = torch.tensor([0, 9, 3]), torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0]])
    codes = attribute_codes(labels, attrs, 10)
    l2, a2 = decode_codes(codes, 10)
    assert torch.equal(l2, labels) and torch.equal(a2, attrs)


def _words(text):  # split at hyphens too, as MiniLM's tokenizer does: "off-white" would leak "white"
    return " " + re.sub(r"[^a-z]+", " ", text.lower()) + " "


def _heldout_phrases():
    out = [n for k in NOUNS for _, n in NOUNS[k]["heldout"]]
    out += [w for a in WORDS for ws in WORDS[a]["heldout"] for w in ws]
    return out + [t.split("{")[0].strip(" ,") for t in TEMPLATES["heldout"] if t.split("{")[0].strip(" ,")]


def test_splits_are_disjoint_and_deterministic():
    names = FASHION_MNIST_CLASSES
    train = split_captions(names, "train")
    assert train == split_captions(names, "train") and len({c.text for c in train}) == len(train)
    corpus = [_words(c.text) for c in train]
    for phrase in _heldout_phrases():
        assert not any(_words(phrase) in c for c in corpus), phrase
    prompts = heldout_prompts(names)
    assert prompts == heldout_prompts(names)
    assert not {p.text for p in prompts} & {c.text for c in train}
    # every class, every combination of its applicable attributes, all stated
    for k, name in enumerate(names):
        usable = len(ATTRIBUTES) - len(NOT_APPLICABLE.get(name, ()))
        mine = [p for p in prompts if p.label == k]
        assert len({p.attrs for p in mine}) == 2 ** usable == len(mine)
    # the same combinations in training phrasings: each prompt is a training caption stating the same facts
    seen = heldout_prompts(names, "train")
    by_text = {c.text: c for c in train}
    assert [(p.label, p.attrs) for p in seen] == [(p.label, p.attrs) for p in prompts]
    assert all(p.text in by_text and by_text[p.text] == p for p in seen)
    with pytest.raises(CondiffError, match="caption split"):
        heldout_prompts(names, "test")


def test_rich_vocabulary_adds_sampled_captions_and_never_a_heldout_word():
    names = FASHION_MNIST_CLASSES
    basic, rich = split_captions(names, "train"), split_captions(names, "train", "rich")
    assert rich == split_captions(names, "train", "rich") and rich[:len(basic)] == basic  # fixed seed, basic first
    assert len({c.text for c in rich}) == len(rich) > len(basic) + 8000
    corpus = [_words(c.text) for c in rich]
    for phrase in _heldout_phrases():  # the held-out split is the same for both vocabularies, and unseen in either
        assert not any(_words(phrase) in c for c in corpus), phrase
    # the rich words and nouns are used, each caption states what its attributes say, with its own value's words
    extra = rich[len(basic):]
    text = " ".join(_words(c.text) for c in extra)
    assert all(_words(w) in text for a in RICH_WORDS for ws in RICH_WORDS[a] for w in ws)
    assert all(_words(n) in text for k in RICH_NOUNS for n in RICH_NOUNS[k])
    for c in extra:
        for a, v in enumerate(c.attrs):
            words = WORDS[ATTRIBUTES[a]]["train"]
            mine = [w for val in (0, 1) for w in words[val] + RICH_WORDS[ATTRIBUTES[a]][val]
                    if _words(w) in _words(c.text) and (val == v or v == -1)]
            other = [w for w in words[1 - v] + RICH_WORDS[ATTRIBUTES[a]][1 - v]] if v >= 0 else []
            assert (v == -1 and not mine) or (v >= 0 and mine), (c, ATTRIBUTES[a])
            assert not any(_words(w) in _words(c.text) for w in other if w not in mine), (c, ATTRIBUTES[a])
    # every class and attribute pattern got its draws (repeats removed), and the training phrasings stay captions
    per = {}
    for c in extra:
        per[(c.label, c.attrs)] = per.get((c.label, c.attrs), 0) + 1
    assert len(per) == 7 * 27 + 3 + 2 * 9 and min(per.values()) >= RICH_PER_PATTERN // 4
    assert {p.text for p in heldout_prompts(names, "train")} <= {c.text for c in rich}
    with pytest.raises(CondiffError, match="caption vocabulary"):
        split_captions(names, "train", "fancy")
    with pytest.raises(CondiffError, match="training vocabulary"):
        split_captions(names, "heldout", "rich")


def test_captions_never_state_an_attribute_that_does_not_apply():
    for c in split_captions(FASHION_MNIST_CLASSES, "train", "rich"):
        for a in NOT_APPLICABLE.get(FASHION_MNIST_CLASSES[c.label], ()):
            assert c.attrs[ATTRIBUTES.index(a)] == -1


def test_caption_table_rows_are_exactly_the_true_captions():
    caps = split_captions(["Dress", "Sandal"], "train")
    table, counts = caption_table(caps, 2)
    code = int(attribute_codes(torch.tensor([0]), torch.tensor([[1, 0, 1]]), 2))
    rows = [caps[i] for i in table[code, :counts[code]].tolist()]
    assert rows and all(c.label == 0 for c in rows)
    assert all(v in (-1, want) for c in rows for v, want in zip(c.attrs, (1, 0, 1)))
    # complete: every caption of the class that fits is there
    fits = [c for c in caps if c.label == 0 and all(v in (-1, w) for v, w in zip(c.attrs, (1, 0, 1)))]
    assert len(fits) == int(counts[code])
    assert (table[code, counts[code]:] == -1).all()


def test_make_caption_grammar():
    assert make_caption("a", "dress", {"brightness": "dark", "texture": "patterned"}, "{np}") == \
        "a dark patterned dress"
    assert make_caption("a", "pair of trousers", {"brightness": "light", "texture": "plain"}, "{np_comma}") == \
        "a light, plain pair of trousers"
    assert make_caption("a", "overcoat", {}, "{np}") == "an overcoat"
    assert make_caption("a", "coat", {"shape": "wide"}, "{bare} that is {adjs}") == "a coat that is wide"


class FakeEncoder:
    name = "fake"

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        g = [torch.Generator().manual_seed(sum(map(ord, t))) for t in texts]
        return torch.stack([torch.randn(8, generator=gi) for gi in g])


def test_caption_bank_caches_by_caption(tmp_path):
    enc, path = FakeEncoder(), tmp_path / "bank.safetensors"
    bank = CaptionBank.build(["a", "b c"], enc, cache=path)
    again = CaptionBank.build(["a", "b c"], enc, cache=path)
    assert enc.calls == 1 and torch.equal(again.embeddings, bank.embeddings)
    assert torch.equal(again.lookup(["b c", "a"]), bank.embeddings[[1, 0]])
    CaptionBank.build(["a", "d"], enc, cache=path)  # other captions: encoded again
    assert enc.calls == 2
    with pytest.raises(CondiffError):
        bank.lookup(["zzz"])
