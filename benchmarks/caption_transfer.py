"""How much of a held-out prompt the text encoder itself carries over to the training captions (issue 20).

Both text routes see a prompt only through its all-MiniLM-L6-v2 embedding. This script asks, with no
diffusion model at all, whether that embedding maps the held-out phrasings of condiff.captions onto
training captions that state the same facts:

* **nearest training caption:** for each held-out prompt (one per class x attribute combination), the
  training caption of highest cosine similarity; the share with the prompt's class, and with each
  attribute value the prompt states;
* **linear probes:** a ridge least-squares probe per attribute, fitted on the training captions'
  embeddings (what a linear caption projection, such as the text-conditional UNet's, can learn), scored
  on the held-out prompts;
* **word pairs:** cos(E("a W dress"), E("a P dress")) against cos(E("a W dress"), E("a N dress")) for each
  held-out word W, P the first training word of its own value and N of the other value.

    .venv/bin/python benchmarks/caption_transfer.py [--vocabulary basic|rich] [--cache runs/text-cfg/captions.safetensors]

``--vocabulary rich`` fits the probes on the rich training vocabulary (condiff.captions.VOCABULARIES: many more
nouns, words and templates); the held-out prompts are the same. About 80 s of one CPU thread to embed the 10,788
basic training captions (150 s for the 20,654 rich ones), unless --cache holds them (a text-conditional run
folder's captions.safetensors does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from condiff.captions import (ATTRIBUTES, VOCABULARIES, WORDS, CaptionBank, heldout_prompts,  # noqa: E402
                              split_captions)
from condiff.data import FASHION_MNIST_CLASSES  # noqa: E402
from condiff.similarity.text import load_text_encoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="a CaptionBank file of the training captions (reused if it holds them)")
    ap.add_argument("--vocabulary", choices=VOCABULARIES, default="basic",
                    help="the training vocabulary the probes are fitted on (default basic)")
    args = ap.parse_args()
    names = FASHION_MNIST_CLASSES
    te = load_text_encoder("cpu")
    train, held = split_captions(names, "train", args.vocabulary), heldout_prompts(names)
    bank = CaptionBank.build([c.text for c in train], te, cache=args.cache)
    E = F.normalize(bank.lookup([c.text for c in train]).float(), dim=-1)
    Q = F.normalize(torch.as_tensor(te.encode([c.text for c in held])).float(), dim=-1)

    nn = (Q @ E.T).argmax(1).tolist()
    print(f"{len(held)} held-out prompts, {len(train)} training captions ({args.vocabulary} vocabulary)")
    print(f"nearest training caption has the prompt's class: {sum(train[j].label == h.label for j, h in zip(nn, held)) / len(held):.3f}")
    X = torch.cat([E, torch.ones(len(E), 1)], 1).double()
    Xq = torch.cat([Q, torch.ones(len(Q), 1)], 1).double()
    for a, name in enumerate(ATTRIBUTES):
        pairs = [(train[j], h) for j, h in zip(nn, held) if h.attrs[a] >= 0]
        same = sum(t.attrs[a] == h.attrs[a] for t, h in pairs) / len(pairs)  # unstated counts as a miss
        idx = [i for i, c in enumerate(train) if c.attrs[a] >= 0]
        y = torch.tensor([train[i].attrs[a] * 2.0 - 1 for i in idx]).double()
        W = torch.linalg.solve(X[idx].T @ X[idx] + 1e-2 * torch.eye(X.shape[1]).double(), X[idx].T @ y)
        hq = [i for i, c in enumerate(held) if c.attrs[a] >= 0]
        truth = torch.tensor([held[i].attrs[a] for i in hq])
        probe = float(((Xq[hq] @ W > 0).long() == truth).double().mean())
        fit = float(((X[idx] @ W > 0) == (y > 0)).double().mean())
        print(f"{name:10s}: nearest caption states the same value {same:.3f}; linear probe {fit:.3f} on training "
              f"captions, {probe:.3f} on held-out prompts ({len(hq)})")
    print("held-out word W: cos to its own value's training word vs the other value's, in 'a W dress'")
    for a in ATTRIBUTES:
        for v in (0, 1):
            own, other = WORDS[a]["train"][v][0], WORDS[a]["train"][1 - v][0]
            for w in WORDS[a]["heldout"][v]:
                q, p, n = F.normalize(torch.as_tensor(te.encode([f"a {w} dress", f"a {own} dress",
                                                                 f"a {other} dress"])).float(), dim=-1)
                s_own, s_other = float(q @ p), float(q @ n)
                print(f"  {w:10s} -> {own:9s} {s_own:.3f}  vs {other:9s} {s_other:.3f}"
                      f"{'' if s_own > s_other else '   (closer to the opposite)'}")


if __name__ == "__main__":
    main()
