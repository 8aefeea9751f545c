"""Evaluation of generated samples with an independent judge network.

The article's claim to measure: a larger guidance scale gamma (eq 8) or weight w
(eq 24) makes samples more relevant to the condition and less diverse.  This
module scores a set of samples on both axes with a :class:`~condiff.nets.JudgeNet`
trained on *clean* data (never the noise-aware classifier that guided them:
guidance is a gradient attack on that classifier, eqs 6-8):

* fidelity to the data: FID_fm (Frechet distance in the judge's feature space),
  k-NN precision / density;
* coverage of the data: k-NN recall / coverage, intra-class diversity;
* relevance to the condition: per-class judge accuracy and confidence.

Every statistic comes with its real-data floor: the same statistic for real
training images with the same class counts as the samples, against the same
held-out reference, so a number can be read against what real data gets.
The metric formulas themselves live in :mod:`condiff.metrics`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import atomic_write_text, load_model
from .data import NPZ_READ_ERRORS, ImageDataset, load_dataset, to_unit
from .errors import CondiffError
from .metrics import density_coverage, diversity, fid_from_features, judge_accuracy, per_class_diversity, \
    precision_recall
from .training import TrainConfig, train

__all__ = ["JUDGE_SEED", "CleanClassifierTask", "train_judge", "load_judge", "default_judge", "judge_outputs",
           "Evaluator", "read_samples", "evaluate_file", "format_report", "to_json"]

#: Default seed of the judge: differs from the guidance nets' default (0).
JUDGE_SEED = 1234
ENV_JUDGE = "CONDIFF_JUDGE"


# ------------------------------------------------------------------------------------------- training
class CleanClassifierTask:
    """Cross-entropy of a classifier on clean images x_0 (the judge; no noise, no t)."""

    name = "judge"

    def config(self) -> dict:
        return {"task": self.name}

    def loss(self, model, x0, y, generator):
        logits = model(x0).float()
        correct = float((logits.argmax(1) == y).sum())
        return F.cross_entropy(logits, y), {"acc": (correct, len(y))}


@torch.no_grad()
def judge_outputs(judge, images: torch.Tensor, batch_size: int = 500, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Judge features (N, feature_dim) and logits (N, num_classes) of images (N, C, H, W) in [-1, 1]."""
    judge.eval()
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f, z = judge.features_and_logits(images[i:i + batch_size].to(device).float())
        feats.append(f.cpu())
        logits.append(z.cpu())
    return torch.cat(feats), torch.cat(logits)


def train_judge(train_data: ImageDataset, test_data: ImageDataset, out_dir: str | Path, cfg: TrainConfig, *,
                channels=(32, 64, 128), feature_dim: int = 128, dropout: float = 0.3, data_spec: str | None = None,
                device="cpu", progress: bool = True, resume: bool = True) -> tuple[Path, dict]:
    """Train a :class:`JudgeNet` on clean images with :func:`condiff.training.train`; report test accuracy.

    Writes ``out_dir/judge.json`` with the held-out accuracy (overall and per class).
    Returns (final checkpoint folder, that report).
    """
    from .nets import JudgeNet

    C, H, W = train_data.shape
    if H != W:
        raise CondiffError(f"images must be square, got {H}x{W}")
    if test_data.shape != train_data.shape:
        raise CondiffError(f"test images are {test_data.shape}, training images {train_data.shape}")
    names = train_data.class_names or [str(i) for i in range(train_data.num_classes)]
    torch.manual_seed(cfg.seed)  # the judge's initial weights depend on its own seed
    model = JudgeNet(C, H, channels, feature_dim, len(names), dropout).to(device)
    meta = {"class_names": names, "image_shape": [C, H, W], "data": data_spec}
    final = train(model, CleanClassifierTask(), train_data, cfg, out_dir, meta=meta, device=device,
                  resume=resume, progress=progress)
    judge, _ = load_model(final, device)
    _, logits = judge_outputs(judge, test_data.images, device=device)
    acc = judge_accuracy(logits, test_data.labels, len(names))
    report = {"checkpoint": str(final), "test_accuracy": acc["accuracy"], "test_images": len(test_data),
              "per_class_accuracy": dict(zip(names, _json_floats(acc["per_class_accuracy"]))),
              "seed": cfg.seed, "steps": cfg.steps}
    atomic_write_text(Path(out_dir) / "judge.json", json.dumps(report, indent=2))
    return final, report


def default_judge() -> Path:
    """The judge used when none is given: $CONDIFF_JUDGE, else the shipped one (condiff.zoo role "judge")."""
    env = os.environ.get(ENV_JUDGE)
    if env:
        return Path(env)
    from .zoo import shipped

    try:
        return shipped("judge")
    except CondiffError:
        raise CondiffError(f"no judge network: pass --judge DIR (train one with 'condiff train-judge --out DIR'), "
                           f"set ${ENV_JUDGE}, or install the shipped one") from None


def load_judge(path=None, device="cpu"):
    """Load a judge checkpoint (default: :func:`default_judge`); returns (judge, config)."""
    path = path if path is not None else default_judge()
    model, config = load_model(path, device)
    if config.get("task") != "judge":
        raise CondiffError(f"{path}: not a judge checkpoint (task {config.get('task')!r}); "
                           "train one with 'condiff train-judge'")
    return model, config


# ------------------------------------------------------------------------------------------- evaluation
def _stratified(pool_labels: torch.Tensor, counts: dict[int, int], seed: int) -> torch.Tensor:
    """Indices into a labelled pool with ``counts[c]`` random images of each class c (fewer if the pool lacks them)."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c, k in sorted(counts.items()):
        where = torch.nonzero(pool_labels == c).flatten()
        if len(where) == 0:
            raise CondiffError(f"the real data has no images of class {c}")
        idx.append(where[torch.randperm(len(where), generator=g)[:k]])
    return torch.cat(idx)


def _json_floats(values):
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]


class Evaluator:
    """Scores sample sets against real data with one judge; caches the reference features.

    Reference sets, for samples with class counts n_c (all samples in one class 0 when
    unlabelled, i.e. the whole data distribution):

    * R_full: every held-out (test) image of the classes present -- the FID_fm reference;
    * R_n:    n_c random held-out images of each class -- the reference of the k-NN metrics;
    * T_n:    n_c random training images of each class -- the real-data floor of every statistic.

    Args:
        judge: a :class:`~condiff.nets.JudgeNet` (eval mode).
        real_train, real_test: real images and labels (e.g. Fashion-MNIST train and test).
        class_names: names of the judge's classes.
        k_pr, k_dc: neighbour counts of precision/recall (3) and density/coverage (5).
        seed: seed of the reference subsets (the same for every call: paired comparisons).
    """

    def __init__(self, judge, real_train: ImageDataset, real_test: ImageDataset, class_names=None, *,
                 device="cpu", batch_size: int = 500, k_pr: int = 3, k_dc: int = 5, seed: int = 0):
        self.judge, self.device, self.batch_size = judge.eval(), device, batch_size
        self.shape = (judge.in_channels, judge.image_size, judge.image_size)
        for name, d in (("training", real_train), ("test", real_test)):
            if d.shape != self.shape:
                raise CondiffError(f"the real {name} images are {'x'.join(map(str, d.shape))}, the judge takes "
                                   f"{'x'.join(map(str, self.shape))}")
        self.train, self.test = real_train, real_test
        self.num_classes = judge.num_classes
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])
        self.k_pr, self.k_dc, self.seed = k_pr, k_dc, seed
        self._test_out = None

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of images (N, C, H, W) in [-1, 1]."""
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.shape:
            raise CondiffError(f"samples have shape {tuple(images.shape[1:])}, the judge takes images of shape "
                               f"{self.shape} (C, H, W)")
        if not torch.isfinite(images).all():
            raise CondiffError("samples contain NaN or infinite values")
        return judge_outputs(self.judge, images, self.batch_size, self.device)

    def _test_outputs(self):
        if self._test_out is None:
            self._test_out = judge_outputs(self.judge, self.test.images, self.batch_size, self.device)
        return self._test_out

    def evaluate(self, images: torch.Tensor, labels=None) -> dict:
        """All metrics of a sample set.

        Args:
            images: samples (N, C, H, W) in [-1, 1], N >= max(k_pr, k_dc) + 1.
            labels: intended class of each sample (N,) ints, or None (unconditional samples).
        Returns:
            a JSON-able dict; see :func:`format_report` for the keys.
        """
        feats, logits = self.outputs(images)
        n = feats.shape[0]
        if n <= max(self.k_pr, self.k_dc):
            raise CondiffError(f"need more than {max(self.k_pr, self.k_dc)} samples to evaluate, got {n}")
        if labels is not None:
            labels = torch.as_tensor(labels).long().flatten()
            if labels.shape[0] != n:
                raise CondiffError(f"{n} samples but {labels.shape[0]} labels")
            if (labels < 0).any() or (labels >= self.num_classes).any():
                raise CondiffError(f"labels must lie in [0, {self.num_classes - 1}] (the judge's classes)")
            counts = {int(c): int(k) for c, k in zip(*torch.unique(labels, return_counts=True))}
        else:
            counts = {c: int(k) for c, k in enumerate(_split_evenly(n, self.test.labels, self.num_classes))}
        test_f, test_z = self._test_outputs()
        present = torch.tensor(sorted(counts))
        in_classes = torch.isin(self.test.labels, present)
        ref_full = test_f[in_classes]
        r_idx = _stratified(self.test.labels, counts, self.seed)
        t_idx = _stratified(self.train.labels, counts, self.seed + 1)
        real_f, real_z = judge_outputs(self.judge, self.train.images[t_idx], self.batch_size, self.device)
        real_y = self.train.labels[t_idx]
        ref_n = test_f[r_idx]

        out = {"n": n, "n_reference": int(ref_full.shape[0]), "n_real": int(real_f.shape[0]),
               "labelled": labels is not None,
               "classes": [self.class_names[c] for c in sorted(counts)],
               "fid_fm": fid_from_features(ref_full, feats), "fid_fm_floor": fid_from_features(ref_full, real_f)}
        out["precision"], out["recall"] = precision_recall(ref_n, feats, k=self.k_pr)
        out["density"], out["coverage"] = density_coverage(ref_n, feats, k=self.k_dc)
        floor = {}
        floor["precision"], floor["recall"] = precision_recall(ref_n, real_f, k=self.k_pr)
        floor["density"], floor["coverage"] = density_coverage(ref_n, real_f, k=self.k_dc)
        out["real"] = floor

        if labels is not None:
            out.update(self._conditional(feats, logits, labels, real_f, real_y, test_z[r_idx],
                                         self.test.labels[r_idx]))
        else:
            hist = torch.bincount(logits.argmax(1), minlength=self.num_classes).double() / n
            out["judge_predicted_fraction"] = dict(zip(self.class_names, hist.tolist()))
            out["judge_max_confidence"] = torch.softmax(logits.double(), 1).max(1).values.mean().item()
            out["diversity"] = diversity(feats)
            out["diversity_real"] = diversity(real_f)
        out["diversity_ratio"] = out["diversity"] / out["diversity_real"] if out["diversity_real"] > 0 else None
        return out

    def _conditional(self, feats, logits, labels, real_f, real_y, ref_z, ref_y) -> dict:
        acc = judge_accuracy(logits, labels, self.num_classes)
        acc_real = judge_accuracy(ref_z, ref_y, self.num_classes)
        names = self.class_names
        keep = [c for c, k in enumerate(acc["per_class_count"]) if k > 0]
        several = [c for c in keep if acc["per_class_count"][c] >= 2]
        div, div_real = {}, {}
        if several:
            mask = torch.isin(labels, torch.tensor(several))
            div = per_class_diversity(feats[mask], labels[mask])
            mask_r = torch.isin(real_y, torch.tensor(several))
            div_real = per_class_diversity(real_f[mask_r], real_y[mask_r])
        per_class = {names[c]: {"count": acc["per_class_count"][c],
                                "judge_accuracy": acc["per_class_accuracy"][c],
                                "judge_confidence": acc["per_class_confidence"][c],
                                "judge_accuracy_real": acc_real["per_class_accuracy"][c],
                                "diversity": div.get(c), "diversity_real": div_real.get(c)} for c in keep}
        return {"judge_accuracy": acc["accuracy"], "judge_confidence": acc["confidence"],
                "judge_accuracy_real": acc_real["accuracy"], "judge_confidence_real": acc_real["confidence"],
                "diversity": float(np.mean(list(div.values()))) if div else float("nan"),
                "diversity_real": float(np.mean(list(div_real.values()))) if div_real else float("nan"),
                "per_class": per_class}


def _split_evenly(n: int, pool_labels: torch.Tensor, num_classes: int) -> list[int]:
    """Class counts of n unlabelled samples for the real-data floor: proportional to the pool's classes."""
    freq = torch.bincount(pool_labels, minlength=num_classes).double()
    exact = freq / freq.sum() * n
    counts = exact.floor().long()
    rest = n - int(counts.sum())
    counts[torch.argsort(exact - counts, descending=True)[:rest]] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------------- files
def read_samples(path: str | Path, shape=None) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Samples from an .npz (``images`` uint8 (N, H, W[, C]), optional ``labels``, ``class_names``).

    Returns (images (N, C, H, W) in [-1, 1], labels or None when the file has none, class names).
    """
    path = Path(path)
    if not path.is_file():
        raise CondiffError(f"samples file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise CondiffError(f"{path}: no 'images' array")
            images = z["images"]
            labels = np.asarray(z["labels"]) if "labels" in z else None
            names = [str(s) for s in z["class_names"]] if "class_names" in z else []
    except CondiffError:
        raise
    except NPZ_READ_ERRORS as e:
        raise CondiffError(f"{path}: cannot read .npz ({e})") from None
    if images.ndim not in (3, 4) or len(images) == 0:
        raise CondiffError(f"{path}: expected images of shape (N, H, W[, C]), got {images.shape}")
    x = to_unit(images)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise CondiffError(f"{path}: images are {'x'.join(map(str, x.shape[1:]))} (CxHxW), the judge takes "
                           f"{'x'.join(map(str, shape))}")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(x) or not np.issubdtype(labels.dtype, np.integer):
            raise CondiffError(f"{path}: 'labels' must be {len(x)} integers, got {labels.dtype} {labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return x, labels, names


def load_real_data(spec, shape) -> tuple[ImageDataset, ImageDataset]:
    """Real training and held-out images for the reference statistics (same spec as ``--data``)."""
    train_data = load_dataset(spec, "train", size=shape[-1], channels=shape[0])
    test_data = load_dataset(spec, "test", size=shape[-1], channels=shape[0])
    return train_data, test_data


def evaluate_file(samples: str | Path, judge=None, *, data=None, labels="file", device="cpu", seed: int = 0,
                  batch_size: int = 500) -> dict:
    """Evaluate an .npz of samples with a judge checkpoint; ``labels`` is "file", "none" or a class index."""
    judge_net, jconf = load_judge(judge, device)
    shape = tuple(jconf.get("image_shape") or (judge_net.in_channels, judge_net.image_size, judge_net.image_size))
    x, y, _ = read_samples(samples, shape)
    if labels == "none":
        y = None
    elif labels != "file":
        y = torch.full((len(x),), int(labels), dtype=torch.long)
    train_data, test_data = load_real_data(data if data is not None else jconf.get("data"), shape)
    ev = Evaluator(judge_net, train_data, test_data, jconf.get("class_names"), device=device, seed=seed,
                   batch_size=batch_size)
    out = ev.evaluate(x, y)
    out["samples"] = str(samples)
    out["judge"] = str(judge if judge is not None else default_judge())
    return out


def to_json(obj) -> str:
    """JSON with NaN/inf written as null (strict JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(u) for k, u in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(u) for u in v]
        return v
    return json.dumps(clean(obj), indent=2)


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_report(r: dict) -> str:
    """Human-readable summary of :meth:`Evaluator.evaluate`'s dict (samples vs the real-data floor)."""
    lines = [f"{r['n']} samples, classes: {', '.join(r['classes'])}",
             "real data = training images with the samples' class counts (judge rows: held-out images)",
             f"{'metric':<22}{'samples':>10}{'real data':>11}",
             f"{'FID_fm':<22}{_fmt(r['fid_fm'], '.2f'):>10}{_fmt(r['fid_fm_floor'], '.2f'):>11}"]
    for k in ("precision", "recall", "density", "coverage"):
        lines.append(f"{k:<22}{_fmt(r[k]):>10}{_fmt(r['real'][k]):>11}")
    if r["labelled"]:
        lines.append(f"{'judge accuracy':<22}{_fmt(r['judge_accuracy']):>10}{_fmt(r['judge_accuracy_real']):>11}")
        lines.append(f"{'judge confidence':<22}{_fmt(r['judge_confidence']):>10}"
                     f"{_fmt(r['judge_confidence_real']):>11}")
    lines.append(f"{'intra-class diversity' if r['labelled'] else 'diversity':<22}{_fmt(r['diversity']):>10}"
                 f"{_fmt(r['diversity_real']):>11}")
    if r["labelled"]:
        lines.append(f"{'class':<16}{'n':>5}{'judge acc':>10}{'conf':>7}{'real acc':>9}{'div':>7}{'real div':>9}")
        for name, c in r["per_class"].items():
            lines.append(f"{name[:15]:<16}{c['count']:>5}{_fmt(c['judge_accuracy']):>10}"
                         f"{_fmt(c['judge_confidence'], '.2f'):>7}{_fmt(c['judge_accuracy_real']):>9}"
                         f"{_fmt(c['diversity'], '.2f'):>7}{_fmt(c['diversity_real'], '.2f'):>9}")
    else:
        top = sorted(r["judge_predicted_fraction"].items(), key=lambda kv: -kv[1])
        lines.append("judge's predicted classes: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    return "\n".join(lines)
