"""Does style guidance change the samples? Metrics that stripes would move, on the same seeds.

For each style scale, samples the same x_T (CFG w = 1 on a few classes, as ``condiff demo``'s
style grids; DDIM with eta 1) and measures, against the style image s:

* ``gram_judge``: the unit-norm Gram distance (``condiff.similarity.gram_distance``) between the
  feature maps of the *judge*'s three convolutions of the sample and of s. The judge never guides,
  so this is not the quantity the guidance optimises;
* ``gram_e1``: the same in E1's features at t = 0 (what guidance optimises, for comparison);
* ``stripe_energy``: the share of the sample's spectral energy (DC removed) at the style image's
  dominant spatial frequency and its two neighbours along that axis.

Real-data rows give the floors: real images of the same classes, and the style image itself.

    OMP_NUM_THREADS=1 python benchmarks/style_eval.py --n 64 --scales 0,10,30,100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from condiff.compose import Guidance, Sampling, compose
from condiff.data import load_dataset
from condiff.evaluation import load_judge
from condiff.images import load_image
from condiff.pipeline import generate, load_diffusion
from condiff.similarity import StyleSimilarity, load_encoder
from condiff.similarity.terms import gram_distance
from condiff.zoo import reference, shipped


def judge_maps(judge, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps after each of the judge's three convolutions (B, C_l, H_l, W_l)."""
    maps, h = [], x
    for layer in judge.body:
        h = layer(h)
        if isinstance(layer, torch.nn.Sequential):  # one conv + BN + ReLU block
            maps.append(h)
        if isinstance(layer, torch.nn.AdaptiveAvgPool2d):
            break
    return maps


def dominant_frequency(s: torch.Tensor) -> tuple[int, int]:
    """(ky, kx) of the largest non-DC Fourier coefficient of a (1, H, W) image."""
    f = torch.fft.rfft2(s[0] - s[0].mean()).abs()
    f[0, 0] = 0
    ky, kx = divmod(int(f.argmax()), f.shape[1])
    return ky, kx


def stripe_energy(x: torch.Tensor, freq: tuple[int, int]) -> torch.Tensor:
    """Share of each image's non-DC spectral energy at ``freq`` and its two neighbours along it, (B,)."""
    f = torch.fft.rfft2(x[:, 0] - x[:, 0].mean((1, 2), keepdim=True)).abs().pow(2)
    f[:, 0, 0] = 0
    ky, kx = freq
    H = f.shape[1]
    if kx == 0:  # horizontal stripes: energy along the ky axis
        band = sum(f[:, (ky + d) % H, 0] for d in (-1, 0, 1))
    else:
        band = sum(f[:, ky, min(max(kx + d, 0), f.shape[2] - 1)] for d in (-1, 0, 1))
    return band / f.flatten(1).sum(1).clamp_min(1e-12)


@torch.no_grad()
def metrics(x, style, judge, enc, freq) -> dict:
    g_judge = gram_distance(judge_maps(judge, x), judge_maps(judge, style))
    t0 = torch.zeros(len(x), dtype=torch.long)
    g_e1 = gram_distance(enc.features(x, t0), enc.features(style, t0[:1]))
    e = stripe_energy(x, freq)
    return {"gram_judge": round(float(g_judge.mean()), 4), "gram_e1": round(float(g_e1.mean()), 4),
            "stripe_energy": round(float(e.mean()), 4), "stripe_energy_median": round(float(e.median()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--scales", default="0,10,30,100")
    ap.add_argument("--classes", default="0,2,3", help="CFG classes, cycled over the samples")
    ap.add_argument("--cfg-w", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--style", default="stripes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args()

    model, schedule, config = load_diffusion(shipped("diffusion"))
    enc, _ = load_encoder(shipped("image-encoder"), "image")
    judge, _ = load_judge(shipped("judge"))
    judge.eval()
    shape = tuple(config["image_shape"])
    style = load_image(reference(args.style), shape[1], shape[0])[None]
    freq = dominant_frequency(style[0])
    classes = [int(c) for c in args.classes.split(",")]
    y = torch.tensor([classes[i % len(classes)] for i in range(args.n)])
    sampling = Sampling("ddim", args.steps, options={"eta": args.eta})
    report = {"settings": vars(args), "dominant_frequency": freq, "rows": {}}
    real = load_dataset(None, "test")
    pick = torch.cat([(real.labels == c).nonzero()[:, 0][: args.n // len(classes) + 1] for c in classes])[: args.n]
    report["rows"]["real images of the classes"] = metrics(real.images[pick], style, judge, enc, freq)
    report["rows"]["the style image"] = metrics(style, style, judge, enc, freq)
    for scale in [float(s) for s in args.scales.split(",")]:
        t0 = time.time()
        terms = [StyleSimilarity.from_encoder(enc, style[0], scale, schedule)] if scale else []
        eps, shift = compose(model, schedule, Guidance(cfg_w=args.cfg_w, terms=terms), sampling)
        x = generate(eps, schedule, args.n, shape=shape, cond={"y": y}, mean_shift=shift, seed=args.seed,
                     batch_size=args.n, **sampling.kwargs())
        row = metrics(x, style, judge, enc, freq)
        row["seconds"] = round(time.time() - t0, 1)
        report["rows"][f"style scale {scale:g}"] = row
        if args.out:
            from condiff.images import save_grid

            save_grid(x[:24], f"{args.out}-scale-{scale:g}.png", nrow=8)
        print(f"scale {scale:g}: {row}", flush=True)
    for name, row in report["rows"].items():
        print(f"{name:32s} {row}")
    if args.out:
        with open(f"{args.out}.json", "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
