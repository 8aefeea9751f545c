"""Similarity guidance on Fashion-MNIST, measured (article eqs 11-15).

Text guidance: for each held-out paraphrase (condiff.similarity.captions.HELD_OUT_PROMPTS and
FRESH_PROMPTS, none of them a training caption) sample the unconditional model guided by
sim = cos(proj(E1(x_t, t)), text_target(E_text(prompt))) and count the samples that an independent
judge classifies as one of the prompt's intended classes (goal >= 80%).
Image guidance: for reference images drawn at random from the test split (the same number per
class) sample guided by sim = cos(E1(x_t, t), target(E2(ref))), once for each --image-priors weight
(0: E2(ref) itself, eq 15 as written; > 0: condiff.similarity.prototype_prior), and count the
samples of the reference's class (goal >= 85%), the samples the judge puts in the class it gives
the reference itself, and the mean cos(E2(sample), E2(ref)) (how close to the reference itself).
Unguided samples from the same x_T give the chance level.

The judge is a clean-image classifier that shares nothing with the guidance networks:
a `condiff train-judge` checkpoint, or a `condiff train-classifier` checkpoint evaluated at t = 0.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/similarity_eval.py --ckpt /work/runs/cfg \
        --text-encoder /work/runs/enc-text --image-encoder /work/runs/enc-image --judge /work/runs/judge
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from condiff.checkpoints import load_model
from condiff.data import load_dataset, resolve_class
from condiff.errors import CondiffError
from condiff.images import save_grid
from condiff.compose import Guidance, compose
from condiff.pipeline import generate, load_diffusion, resolve_device
from condiff.similarity import ImageSimilarity, TextSimilarity, load_encoder
from condiff.similarity.captions import FRESH_PROMPTS, HELD_OUT_PROMPTS
from condiff.similarity.terms import DEFAULT_IMAGE_PRIOR, DEFAULT_SCALES, text_target
from condiff.similarity.text import load_text_encoder


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def load_judge_fn(path, device):
    """A function images -> predicted classes: a judge network, or a noise-aware classifier at t = 0."""
    net, config = load_model(path, device)
    if config.get("task") == "judge":
        return lambda x: net(x.to(device)).argmax(1).cpu(), config
    if config.get("task") == "classifier":
        t0 = torch.zeros(1, dtype=torch.long, device=device)
        return lambda x: net(x.to(device), t0.expand(len(x))).argmax(1).cpu(), config
    raise CondiffError(f"{path}: neither a judge nor a classifier checkpoint")


@torch.no_grad()
def zero_shot(enc, te, schedule, names, device, prior, n: int = 1000, ts=(0, 200, 500)) -> dict:
    """Accuracy of argmax_prompt cos(proj(E1(x_t, t)), text_target(prompt)) over the single-class held-out
    prompts on real test images: the text alignment itself, without the diffusion model."""
    single = [(q, resolve_class(c[0], names)) for q, c in HELD_OUT_PROMPTS + FRESH_PROMPTS if len(c) == 1]
    emb = text_target(enc, te.encode([q for q, _ in single]), prior).to(device)
    cls = torch.tensor([k for _, k in single])
    test = load_dataset(None, "test").subset(n, seed=0)
    g, out = torch.Generator().manual_seed(0), {}
    for t in ts:
        tt = torch.full((len(test),), t, dtype=torch.long)
        x = schedule.add_noise(test.images, tt, torch.randn(test.images.shape, generator=g))
        z = torch.nn.functional.normalize(enc(x.to(device), tt.to(device), "text"), dim=-1)
        out[t] = float((cls[(z @ emb.T).argmax(1).cpu()] == test.labels).float().mean())
    return out


def sampler(model, schedule, shape, args, device):
    conditional = getattr(model, "conditional", False)

    def run(terms, n, start=0, cond=None):
        eps, _ = compose(model, schedule, Guidance(unconditional=conditional, terms=terms))
        with torch.no_grad():
            return generate(eps, schedule, n, shape=shape, cond=cond, sampler="ddim", steps=args.steps, eta=args.eta,
                            seed=args.seed,
                            batch_size=args.batch_size, device=device, clip_x0=args.clip_x0, start=start)
    return run


def references(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` random test images of every class (seeded), grouped by class."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(int(labels.max()) + 1):
        hits = (labels == k).nonzero()[:, 0]
        if len(hits) < per_class:
            raise CondiffError(f"class {k} has {len(hits)} test images, fewer than --refs-per-class {per_class}")
        out.append(hits[torch.randperm(len(hits), generator=g)[:per_class]])
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="eps-model (a conditional one is sampled through its null branch)")
    p.add_argument("--text-encoder", default=None, help="text encoder checkpoint (skip text guidance if absent)")
    p.add_argument("--image-encoder", default=None, help="image encoder checkpoint (skip image guidance if absent)")
    p.add_argument("--judge", required=True, help="judge (condiff train-judge) or classifier checkpoint")
    p.add_argument("--text-scales", type=floats, default=[DEFAULT_SCALES["text"]], help="comma-separated gammas")
    p.add_argument("--image-scales", type=floats, default=[DEFAULT_SCALES["image"]], help="comma-separated gammas")
    p.add_argument("--text-prior", type=float, default=None,
                   help="temperature of the caption prior (default: the encoder's default; 0 = raw prompt)")
    p.add_argument("--per-prompt", type=int, default=20, help="samples per prompt (default 20)")
    p.add_argument("--image-priors", type=floats, default=[0.0, DEFAULT_IMAGE_PRIOR],
                   help=f"comma-separated prototype-prior weights (default 0,{DEFAULT_IMAGE_PRIOR:g})")
    p.add_argument("--refs-per-class", type=int, default=50, help="reference images per class (default 50)")
    p.add_argument("--ref-seed", type=int, default=0, help="seed of the random choice of references (default 0)")
    p.add_argument("--per-ref", type=int, default=2, help="samples per reference image (default 2)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 = DDPM variance (default 0)")
    p.add_argument("--clip-x0", type=float, default=1.0,
                   help="clamp predicted x_0 to [-C, C] (default 1, as condiff sample; 0 = off)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="similarity_eval.json", help="JSON report")
    p.add_argument("--grids", default=None, help="folder for sample grids (one PNG per prompt / reference set)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    model, schedule, config = load_diffusion(args.ckpt, device)
    names = config.get("class_names", [])
    shape = tuple(config["image_shape"])
    judge, judge_cfg = load_judge_fn(args.judge, device)
    run = sampler(model, schedule, shape, args, device)
    grids = Path(args.grids) if args.grids else None
    report = {"ckpt": str(args.ckpt), "judge": str(args.judge), "steps": args.steps, "eta": args.eta, "seed": args.seed,
              "clip_x0": args.clip_x0, "text": {}, "image": {}}

    if args.text_encoder:
        te = load_text_encoder(device)
        enc, _ = load_encoder(args.text_encoder, "text", device)
        prompts = HELD_OUT_PROMPTS + FRESH_PROMPTS
        sets = {"held_out": len(HELD_OUT_PROMPTS), "fresh": len(FRESH_PROMPTS)}
        wanted = [[resolve_class(c, names) for c in classes] for _, classes in prompts]
        report["text"]["prior"] = args.text_prior
        report["text"]["zero_shot_real"] = zero_shot(enc, te, schedule, names, device, args.text_prior)
        print("held-out prompts as a zero-shot classifier of real test images (E1 at t): "
              + ", ".join(f"t={t} {a:.3f}" for t, a in report["text"]["zero_shot_real"].items()))
        plain = judge(run([], args.per_prompt))
        chance = [float(sum((plain == k).float().mean() for k in w)) for w in wanted]
        report["text"]["unguided_share"] = dict(zip([q for q, _ in prompts], chance))
        for scale in args.text_scales:
            t0, rows, oks = time.time(), {}, []
            for (prompt, _), w in zip(prompts, wanted):
                term = TextSimilarity.from_prompt(enc, prompt, scale, te, prior=args.text_prior)
                x = run([term], args.per_prompt)
                pred = judge(x)
                ok = sum(int((pred == k).sum()) for k in w)
                oks.append(ok / len(pred))
                rows[prompt] = {"accuracy": ok / len(pred), "predicted": [names[i] for i in pred.tolist()]}
                if grids:
                    save_grid(x, grids / f"text-{scale:g}-{prompt[:40].replace(' ', '_')}.png", nrow=10)
                print(f"text gamma={scale:g}  {ok / len(pred):5.2f}  {prompt}", file=sys.stderr)
            first = sets["held_out"]
            by_set = {"held_out": sum(oks[:first]) / first, "fresh": sum(oks[first:]) / sets["fresh"]}
            report["text"][f"{scale:g}"] = {"accuracy": by_set["held_out"], "fresh_accuracy": by_set["fresh"],
                                            "all_accuracy": sum(oks) / len(oks),
                                            "samples": len(oks) * args.per_prompt, "prompts": rows,
                                            "seconds": round(time.time() - t0, 1)}
            print(f"text gamma={scale:g}: {by_set['held_out']:.3f} of {first * args.per_prompt} samples of the "
                  f"intended class on HELD_OUT_PROMPTS, {by_set['fresh']:.3f} of {sets['fresh'] * args.per_prompt} "
                  f"on FRESH_PROMPTS (chance {sum(chance) / len(chance):.3f})")

    if args.image_encoder:
        enc, _ = load_encoder(args.image_encoder, "image", device)
        test = load_dataset(None, "test")
        idx = references(test.labels, args.refs_per_class, args.ref_seed)
        refs = test.images[idx].repeat_interleave(args.per_ref, 0)  # one reference per sample
        want = test.labels[idx].repeat_interleave(args.per_ref, 0)
        judged = judge(test.images[idx]).repeat_interleave(args.per_ref, 0)
        with torch.no_grad():
            e_ref = torch.nn.functional.normalize(enc(refs.to(device), None, "e2"), dim=-1).cpu()
        plain = judge(run([], len(refs)))
        report["image"].update(references=idx.tolist(), samples_per_reference=args.per_ref,
                               ref_seed=args.ref_seed, chance=float((plain == want).float().mean()),
                               judge_on_references=float((judged[::args.per_ref] == want[::args.per_ref])
                                                         .float().mean()))
        for scale in args.image_scales:
            for prior in args.image_priors:
                t0, preds, cos = time.time(), [], []
                for lo in range(0, len(refs), args.batch_size):  # a batch of samples, each its own reference
                    ref = refs[lo:lo + args.batch_size]
                    term = ImageSimilarity.from_encoder(enc, None, scale, prior=prior)  # targets: cond["image"]
                    x = run([term], len(ref), start=lo, cond={"image": term.targets(ref.to(device))})
                    preds.append(judge(x))
                    with torch.no_grad():
                        z = torch.nn.functional.normalize(enc(x.to(device), None, "e2"), dim=-1).cpu()
                    cos.append((z * e_ref[lo:lo + args.batch_size]).sum(1))
                    if grids and lo == 0:
                        save_grid(torch.cat([ref[::args.per_ref], x]), grids / f"image-{scale:g}-prior-{prior:g}.png",
                                  nrow=10)
                pred, cos = torch.cat(preds), torch.cat(cos)
                ok = pred == want
                row = {"share_of_reference_class": float(ok.float().mean()),
                       "share_of_judged_reference_class": float((pred == judged).float().mean()),
                       "cos_to_reference_e2": float(cos.mean()), "samples": len(pred),
                       "per_class": {names[k]: float(ok[want == k].float().mean()) for k in range(len(names))},
                       "seconds": round(time.time() - t0, 1)}
                report["image"][f"{scale:g}/prior {prior:g}"] = row
                print(f"image gamma={scale:g} prior={prior:g}: {row['share_of_reference_class']:.3f} of {len(pred)} "
                      f"samples ({len(idx)} references) share the reference's class, "
                      f"{row['share_of_judged_reference_class']:.3f} the class the judge gives the reference; "
                      f"cos(E2(sample), E2(ref)) {row['cos_to_reference_e2']:.3f} "
                      f"(chance {report['image']['chance']:.3f}; judge on the references "
                      f"{report['image']['judge_on_references']:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CondiffError as e:
        print(f"similarity_eval: error: {e}", file=sys.stderr)
        sys.exit(2)
