"""The pure parts of benchmarks/train_ablation.py and benchmarks/train_curve.py: rows -> flags, the table,
CPU-minutes, the caches. (Training and scoring are the library's, tested elsewhere.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import train_ablation as ab  # noqa: E402
import train_curve as tc  # noqa: E402

from condiff.cli import build_parser  # noqa: E402
from condiff.errors import CondiffError  # noqa: E402

# issue 17's v1 command, as the brief gives it (budget flags included)
V1_COMMAND = ("--steps 500 --batch-size 128 --channels 64,96 --blocks 1 --lr 1e-3 --warmup 100 --ema-decay 0.999 "
              "--p-uncond 0.1 --seed 0").split()
V2_LEVER_FLAGS = {"min-snr": ["--min-snr-gamma", "5"], "stratified": ["--t-sampling", "stratified"],
                  "cosine": ["--lr-schedule", "cosine"]}


def _parsed(flags):
    """The train namespace the real CLI makes of these flags."""
    return build_parser().parse_args(["train", "--out", "x", *flags])


def test_v1_row_is_the_old_recipe_and_v2_rows_differ_by_exactly_their_levers():
    budget = ab.Budget()
    v1 = _parsed(ab.row_flags(ab.ROWS["v1"], budget))
    assert vars(v1) == vars(_parsed(V1_COMMAND + ["--ckpt-every", "100", "--keep", "100", "--log-every", "10",
                                                  "--device", "cpu", "--no-progress"]))
    assert (v1.min_snr_gamma, v1.t_sampling, v1.lr_schedule, v1.attention) == (None, "uniform", "constant", False)
    v2 = ab.row_flags(ab.ROWS["v2"], budget)
    assert v2 == ab.row_flags(ab.ROWS["v1"], budget)[:len(V1_COMMAND)] + sum(V2_LEVER_FLAGS.values(), []) + \
        ab.row_flags(ab.ROWS["v1"], budget)[len(V1_COMMAND):]
    for lever, flags in V2_LEVER_FLAGS.items():
        without = ab.row_flags(ab.ROWS[f"v2-no-{lever}"], budget)
        expect = [f for f in v2]
        i = expect.index(flags[0])
        del expect[i:i + 2]
        assert without == expect, lever
    att = _parsed(ab.row_flags(ab.ROWS["v2+attention"], budget))
    assert att.attention and att.min_snr_gamma == 5 and att.lr_schedule == "cosine"
    for target in ("v", "x0"):  # v2 plus the target, nothing else
        row = ab.row_flags(ab.ROWS[f"v2+{target}-target"], budget)
        assert row == v2[:v2.index("--ckpt-every")] + ["--prediction", target] + \
            v2[v2.index("--ckpt-every"):]
        assert _parsed(row).prediction == target and _parsed(v2).prediction is None  # None: eps (the default without --init)


def test_speed_rows_train_the_speed_budget_and_threads_go_to_the_environment():
    budget = ab.Budget(steps=500, speed_steps=30, warmup=100)
    cl = _parsed(ab.row_flags(ab.ROWS["v2+channels-last"], budget))
    assert cl.channels_last and cl.steps == 30 and cl.warmup == 30  # the warm-up never exceeds the row's steps
    assert ab.ROWS["v2+2-threads"].threads == 2 and ab.ROWS["v2+2-threads"].speed_only
    tiny = _parsed(ab.row_flags(ab.ROWS["v1"], ab.Budget(steps=4, channels="8,16", limit=64, data="/d")))
    assert (tiny.steps, tiny.channels, tiny.limit, tiny.data) == (4, [8, 16], 64, "/d")


def test_row_selection():
    assert [r.name for r in ab.select_rows(None)] == ["v1", "v2", "v2-no-min-snr", "v2-no-stratified",
                                                       "v2-no-cosine", "v2+attention", "v2+v-target",
                                                       "v2+x0-target"]
    assert [r.name for r in ab.select_rows("v2+attention, v1")] == ["v2+attention", "v1"]
    with pytest.raises(CondiffError, match="unknown row.*v3"):
        ab.select_rows("v1,v3")
    with pytest.raises(CondiffError, match="unknown lever"):
        ab.row_flags(ab.Row("x", ("ema",)), ab.Budget())


def test_seconds_per_step_is_the_median_window_without_the_first(tmp_path):
    recs = [{"step": 10, "images_per_s": 1.0}] + [{"step": 10 * i, "images_per_s": 128 / s}
                                                  for i, s in enumerate([1.0, 3.0, 1.2, 1.1], 2)]
    assert ab.seconds_per_step(recs, 128) == pytest.approx(1.15)
    assert ab.seconds_per_step(recs[:1], 128) is None
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 6')
    assert ab.read_metrics(tmp_path) == recs  # a line cut by a kill is skipped


def test_summary_takes_the_best_guided_w_and_the_table_shows_it():
    scores = {0.0: {"fid_fm": 40.0, "judge_accuracy": 0.7}, 1.0: {"fid_fm": 14.0, "judge_accuracy": 0.95},
              2.0: {"fid_fm": 11.5, "judge_accuracy": 0.98}, 3.0: {"fid_fm": 12.0, "judge_accuracy": 0.99}}
    row = ab.summarize("v2", scores, 1.234, 500, 1)
    assert (row["fid_w0"], row["best_w"], row["fid_best"], row["judge_best"]) == (40.0, 2.0, 11.5, 0.98)
    speed = ab.summarize("v2+channels-last", {}, 1.1, 30, 1)
    assert speed["fid_w0"] is None and "best_w" not in speed
    table = ab.markdown_table([row, speed], 500).splitlines()
    assert table[2] == "| v2 | v1 + min-SNR-5 + stratified t + cosine decay | 500 | 40.00 | 2 | 11.50 | 0.980 | 1.234 | 1 |"
    assert table[3].startswith("| v2+channels-last |") and table[3].endswith("| - | - | - | - | 1.100 | 1 |")


def test_scores_are_cached_per_key(tmp_path):
    calls = []

    def compute(key):
        calls.append(key)
        return {"fid_fm": float(len(calls))}

    keys = [ab.eval_key(Path("run/checkpoints/step-0000500"), w, 500, 25, 0) for w in (0.0, 2.0)]
    assert len(set(keys)) == 2 and keys[0] != ab.eval_key(Path("step-0000400"), 0.0, 500, 25, 0)
    first = ab.cached_scores(tmp_path / "c.json", keys, compute)
    again = ab.cached_scores(tmp_path / "c.json", keys + ["new"], compute)
    assert calls == keys + ["new"] and again[keys[1]] == first[keys[1]] == {"fid_fm": 2.0}


def test_cpu_minutes_interpolate_the_cumulative_wall_time():
    recs = [{"step": 10, "wall_s": 30.0}, {"step": 20, "wall_s": 90.0}]
    assert tc.cpu_minutes_at(recs, 0) == 0.0
    assert tc.cpu_minutes_at(recs, 5) == pytest.approx(15.0 / 60)
    assert tc.cpu_minutes_at(recs, 20, threads=2) == pytest.approx(3.0)
    assert tc.cpu_minutes_at(recs, 15) == pytest.approx(1.0)
    with pytest.raises(CondiffError, match="beyond the metrics log"):
        tc.cpu_minutes_at(recs, 21)


def test_curve_points_from_checkpoints_and_posthoc_snapshots(tmp_path):
    for step in (100, 200):
        for d in (tmp_path / "checkpoints" / f"step-{step:07d}",
                  tmp_path / "posthoc-ema" / f"step-{step:07d}" / "sigma-0.050",
                  tmp_path / "posthoc-ema" / f"step-{step:07d}" / "sigma-0.100"):
            d.mkdir(parents=True)
            (d / "model.safetensors").write_bytes(b"")
            (d / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-0000300").mkdir()  # incomplete: skipped
    (tmp_path / "metrics.jsonl").write_text('{"step": 100, "wall_s": 120}\n{"step": 200, "wall_s": 300}\n')
    pts = tc.curve_points("v1", tmp_path, None, 1)
    assert [(p["step"], p["cpu_minutes"]) for p in pts] == [(100, 2.0), (200, 5.0)]
    ph = tc.curve_points("v2", tmp_path, 0.05, 2)
    assert [(p["step"], p["cpu_minutes"], Path(p["path"]).name) for p in ph] == [(100, 4.0, "sigma-0.050"),
                                                                                  (200, 10.0, "sigma-0.050")]
    with pytest.raises(CondiffError, match="no post-hoc EMA snapshots of sigma 0.200"):
        tc.curve_points("v2", tmp_path, 0.2, 1)
