"""benchmarks/guidance_table.py (issue 16's table): the goal checks on hand-made rows, and the script's core
(one sweep per row, call counting, the table) on tiny random networks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from condiff.evaluation import Evaluator
from condiff.nets import EncoderNet, JudgeNet, UNet
from condiff.schedule import cosine_schedule
from condiff.sweep import SweepContext
from condiff.x0guidance import at_t0
from helpers import one_thread, shapes_dataset  # noqa: F401  (autouse: one intra-op thread)

_spec = importlib.util.spec_from_file_location("guidance_table",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_table.py")
gt = importlib.util.module_from_spec(_spec)
sys.modules["guidance_table"] = gt  # dataclasses look their module up
_spec.loader.exec_module(gt)


def row(id, family, acc, fid, s, calls=10.0, grad=False, **extra):
    return dict(id=id, label=id, family=family, method=family, scale=1.0, options={}, goal=True, grad=grad, n=1000,
                judge_accuracy=acc, fid_fm=fid, diversity_ratio=0.9, seconds_per_image=s,
                calls=calls if isinstance(calls, dict) else {"total": calls},
                **extra)


CFG = [row("unguided", "unguided", 0.90, 14.0, 0.10, 25), row("cfg-1", "cfg", 0.93, 10.0, 0.20, 50),
       row("cfg-2", "cfg", 0.97, 12.0, 0.20, 50), row("cfg-3", "cfg", 0.99, 15.0, 0.20, 50)]
CLF = [row("clf-16", "classifier", 0.93, 20.0, 0.20, grad=True)]


def by_goal(rows):
    return {g["goal"]: g for g in gt.check_goals(rows)}


def test_goal_clean_classifier_needs_accuracy_and_time():
    ok = row("x0m", "x0-classifier model", 0.91, 40.0, 0.59, grad=True)
    assert by_goal(CLF + [ok])[1]["met"]
    assert by_goal(CLF + [ok])[1]["numbers"]["time_ratio"] == pytest.approx(0.59 / 0.20)
    assert not by_goal(CLF + [dict(ok, seconds_per_image=0.61)])[1]["met"]  # 3.05x the time
    assert not by_goal(CLF + [dict(ok, judge_accuracy=0.89)])[1]["met"]
    assert not by_goal([ok])[1]["met"]  # no noise-aware reference: not measured
    # CPU time decides when both rows have it (the wall clock of a busy machine does not)
    timed = [dict(CLF[0], cpu_seconds_per_image=0.10), dict(ok, seconds_per_image=0.9, cpu_seconds_per_image=0.29)]
    g = by_goal(timed)[1]
    assert g["met"] and g["numbers"]["time_ratio"] == pytest.approx(2.9) and "CPU s/image" in g["text"]
    assert not by_goal([timed[0], dict(timed[1], cpu_seconds_per_image=0.31)])[1]["met"]
    # the fastest qualifying variant is reported
    slow = row("x0m-k2", "x0-classifier model k2", 0.97, 30.0, 0.55, grad=True)
    assert by_goal(CLF + [ok, slow, dict(ok, id="x0f", family="x0-classifier fixed", seconds_per_image=0.3)]
                   )[1]["numbers"]["row"] == "x0f"


def test_goal_beats_cfg_compares_at_equal_accuracy():
    # plain CFG's best at >= 0.95 is w = 2 (FID 12): w = 1 has a lower FID but only 0.93
    apg = row("apg-2", "apg", 0.96, 11.9, 0.2)
    g = by_goal(CFG + [apg])[2]
    assert g["met"] and g["numbers"]["cfg"] == "cfg-2" and g["numbers"]["cfg_fid"] == 12.0
    assert not by_goal(CFG + [dict(apg, fid_fm=12.1)])[2]["met"]
    assert not by_goal(CFG + [dict(apg, judge_accuracy=0.94, fid_fm=5.0)])[2]["met"]  # below the bar
    ag = row("ag-1", "autoguide", 0.95, 11.0, 0.2)
    assert by_goal(CFG + [dict(apg, fid_fm=13.0), ag])[2]["met"]  # either of the two
    assert not by_goal([dict(r, judge_accuracy=0.9) for r in CFG] + [apg])[2]["met"]  # no CFG reference


def test_goal_beats_cfg_reports_the_combination_without_counting_it():
    both = row("agc-1-1", "autoguide+cfg", 0.97, 9.0, 0.3)
    g = by_goal(CFG + [row("ag-1", "autoguide", 0.90, 11.0, 0.2), both])[2]
    assert not g["met"] and g["numbers"]["combination"] == "agc-1-1"
    assert "not counted" in g["text"] and "below plain CFG's best" in g["text"]


def test_goal_interval_side_by_side_timing_decides_the_time():
    iv = row("cfgi-3", "cfg-interval", 0.96, 12.5, 0.17, 37)  # the table's own time: 1.7x unguided
    assert not by_goal(CFG + [iv])[3]["met"]
    timing = {"cfgi-3": {"cpu_ratio": 1.42, "cpu_ratio_range": [1.40, 1.45], "wall_ratio": 1.5},
              "cfg-1": {"cpu_ratio": 1.9, "cpu_ratio_range": [1.8, 2.0], "wall_ratio": 2.0}}
    g = gt.goal_interval(CFG + [iv], timing)
    assert g["met"] and g["numbers"]["time_ratio"] == 1.42 and g["numbers"]["side_by_side"]
    assert g["numbers"]["cfg_time_ratio"] == pytest.approx(0.20 / 0.10)  # cfg-2, the best CFG here, was not timed
    assert "side by side" in g["text"] and "1.70x" in g["text"]
    assert not gt.goal_interval(CFG + [iv], {"cfgi-3": dict(timing["cfgi-3"], cpu_ratio=1.51)})["met"]
    settings = {"timing": timing}
    assert gt.build_result(CFG + [iv], settings)["goals"][2]["met"]


def test_merge_rows_replaces_and_keeps_in_default_order():
    old = [dict(id="a", v=1), dict(id="b", v=1), dict(id="z", v=1)]
    new = [dict(id="b", v=2), dict(id="c", v=2)]
    got = gt.merge_rows(new, old, ["a", "c", "b"])
    assert [(r["id"], r["v"]) for r in got] == [("a", 1), ("c", 2), ("b", 2), ("z", 1)]


def test_goal_interval_needs_fid_accuracy_and_time():
    iv = row("cfgi-3", "cfg-interval", 0.96, 12.5, 0.149, 37)  # within 5% of 12.0, 1.49x unguided's 0.10 s
    g = by_goal(CFG + [iv])[3]
    assert g["met"] and g["numbers"]["time_ratio"] == pytest.approx(1.49)
    assert g["numbers"]["cfg_time_ratio"] == pytest.approx(2.0)
    assert not by_goal(CFG + [dict(iv, seconds_per_image=0.151)])[3]["met"]
    assert not by_goal(CFG + [dict(iv, fid_fm=12.7)])[3]["met"]
    assert not by_goal(CFG + [dict(iv, judge_accuracy=0.94)])[3]["met"]
    assert not by_goal(CFG[1:] + [iv])[3]["met"]  # no unguided row: not measured


def test_goal_noisy_encoder_paragraph_numbers():
    e1 = row("e1", "image E1", 0.96, 30.0, 0.2, grad=True, calls={"eps": 25, "guide": 25, "guide_backward": 25})
    e2 = row("e2", "image E2 on x0", 0.80, 50.0, 0.4, grad=True, calls={"eps": 25, "eps_backward": 25})
    g = by_goal([e1, e2])[4]
    assert g["met"] and g["numbers"]["accuracy_gain"] == pytest.approx(0.16)
    assert g["numbers"]["fid_gain"] == pytest.approx(20.0) and g["numbers"]["time_ratio"] == pytest.approx(0.5)
    assert "eps 25+25b" in g["text"] and "guide 25+25b" in g["text"]
    assert not by_goal([e1])[4]["met"]


def test_recommend_lowest_fid_at_the_bar_else_most_accurate():
    recs = {r["family"]: r for r in gt.recommend(CFG + CLF + [row("x0f", "x0-classifier fixed", 0.9, 50, 0.1,
                                                                 grad=True)])}
    assert "unguided" not in recs
    assert recs["cfg"]["row"] == "cfg-2"  # w = 1 has a lower FID_fm below 0.95
    assert recs["classifier"]["row"] == "clf-16" and recs["classifier"]["why"].startswith("lowest")  # 0.93 >= 0.90
    low = gt.recommend([dict(r, judge_accuracy=0.5 + 0.1 * i) for i, r in enumerate(CFG[1:])])
    assert low[0]["row"] == "cfg-3" and low[0]["why"].startswith("no setting")


def test_default_rows_cover_the_issue():
    rows = gt.default_rows()
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) and len(rows) <= 26
    families = {r.family for r in rows}
    assert {"unguided", "cfg", "cfg-interval", "apg", "cfg++", "autoguide", "classifier", "x0-classifier model",
            "x0-classifier fixed", "x0-classifier model k2", "x0-classifier fixed k2", "image E1",
            "image E2 on x0"} <= families
    # the goal rows are the ones the goals read
    assert all(r.goal for r in rows if r.family in ("cfg", "cfg-interval", "apg", "autoguide")
               or r.family.startswith("x0-classifier"))
    # the interval keeps at most half of the 25 DDIM steps (<= 1.5x the calls of unguided sampling)
    from condiff.schedule import respace

    steps = respace(cosine_schedule(1000), 25)
    assert 2 * sum(gt.INTERVAL[0] <= t <= gt.INTERVAL[1] for t in steps) <= 25


@pytest.fixture(scope="module")
def tiny_lane(tmp_path_factory):
    torch.manual_seed(0)
    schedule = cosine_schedule(100)
    model = UNet(1, 8, (8, 16), blocks=1, num_classes=2).eval()
    weak = UNet(1, 8, (8, 16), blocks=1, num_classes=2).eval()
    clf = EncoderNet(1, 8, (8, 16), blocks=1, out_dim=2).eval()
    judge = JudgeNet(1, 8, (4, 8, 8), feature_dim=8, num_classes=2).eval()
    data = shapes_dataset(64, 8)
    ctx = SweepContext(model, schedule, (1, 8, 8), ["left", "top"])
    ctx.cache.update({"classifier": clf, "x0-classifier": at_t0(clf), "weak": weak})  # as the builders load them
    models = {"model": "tiny-model", "classifier": "tiny-clf", "clean-classifier": "tiny-clf", "weak": "tiny-weak"}
    lane = gt.Lane(models, 4, 0.0, 1.0, 0, 8, ctx=ctx, evaluator=Evaluator(judge, data, data, ["left", "top"]))
    yield lane, tmp_path_factory.mktemp("table")
    lane.close()


@pytest.mark.filterwarnings("ignore::condiff.pipeline.GuidanceWarning")  # random networks saturate
def test_core_counts_calls_and_writes_the_table(tiny_lane):
    lane, out = tiny_lane
    K = 4  # DDIM steps: 99, 66, 33, 0 on T = 100
    rows = [gt.Row("unguided", "unguided", "cfg", 0.0), gt.Row("cfg-2", "cfg", "cfg", 2.0, goal=True),
            gt.Row("cfgi-2", "cfg-interval", "cfg-interval", 2.0, (("interval", "50,70"),), goal=True),
            gt.Row("ag-1", "autoguide", "autoguide", 1.0, models=(("weak", "weak"),), goal=True),
            gt.Row("clf-4", "classifier", "classifier", 4.0, models=(("classifier", "classifier"),), grad=True),
            gt.Row("x0m-4", "x0-classifier model", "x0-classifier", 4.0, models=(("classifier", "clean-classifier"),),
                   grad=True, goal=True),
            gt.Row("x0f-4-k2", "x0-classifier fixed k2", "x0-classifier", 4.0,
                   (("path", "fixed"), ("recurrence", "2")), (("classifier", "clean-classifier"),), grad=True),
            gt.Row("agc-1-1", "autoguide+cfg", "autoguide", 1.0, (("cfg_w", "1"),), (("weak", "weak"),), goal=True)]
    done = [lane.run(r, 8, out) for r in rows]
    calls = {e["id"]: e["calls"] for e in done}
    assert calls["unguided"] == {"eps": K, "total": K}
    assert calls["cfg-2"] == {"eps": 2 * K, "total": 2 * K}
    assert calls["cfgi-2"]["eps"] == K + 1  # only t = 66 lies in [50, 70]: one null forward
    assert calls["ag-1"] == {"eps": K, "weak": K, "total": 2 * K}
    assert calls["clf-4"] == {"eps": K, "guide": K, "guide_backward": K, "total": 3 * K}
    assert calls["x0m-4"] == {"eps": K, "eps_backward": K, "guide": K, "guide_backward": K, "total": 4 * K}
    assert calls["x0f-4-k2"] == {"eps": 2 * K, "guide": 2 * K, "guide_backward": 2 * K, "total": 6 * K}
    assert calls["agc-1-1"] == {"eps": 2 * K, "weak": K, "total": 3 * K}  # CFG's batched 2B forward + the weak one
    for e in done:
        assert (out / "grids" / f"{e['id']}.png").is_file() and 0 <= e["judge_accuracy"] <= 1
        assert e["seconds_per_image"] > 0 and e["n"] == 8

    # a rerun reuses the samples (same file, same calls from the sidecar)
    npz = out / "rows" / "clf-4" / "samples-scale-4.npz"
    stamp = npz.stat().st_mtime_ns
    again = lane.run(rows[4], 8, out)
    assert npz.stat().st_mtime_ns == stamp and again["calls"] == calls["clf-4"]
    assert again["judge_accuracy"] == done[4]["judge_accuracy"]

    settings = {"date": "today", "steps": K, "eta_cfg": 0.0, "eta_grad": 1.0, "seed": 0, "n": 8, "n_goal": 8,
                "jobs": 1, "models": {"model": "tiny"}, "fingerprints": {"model": "0"}}
    result = gt.build_result(done, settings)
    json.dumps(result)  # results.json is plain JSON
    md = gt.table_md(result).splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| row |"))
    assert md[header] == "| " + " | ".join(gt.COLUMNS) + " |"
    body = md[header + 2: header + 2 + len(rows) + 1]
    assert [line.split(" | ")[0] for line in body[:-1]] == [f"| {r.id}" for r in rows]
    assert body[-1].startswith("| real data (training images, n = 8)")
    assert all(line.count("|") == len(gt.COLUMNS) + 1 for line in body)
    assert sum(line[:3] in {f"{k}. " for k in range(1, 5)} for line in md) == 4  # the four goals
    assert any("x0-classifier model" in line for line in md if line.startswith("- "))  # a recommendation


def test_timing_script_times_rows_side_by_side(tiny_lane):
    """benchmarks/guidance_timing.py: every row once per repetition, ratios per repetition to unguided."""
    spec = importlib.util.spec_from_file_location("guidance_timing", Path(gt.__file__).with_name("guidance_timing.py"))
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    from condiff.compose import Sampling

    lane, _ = tiny_lane
    rows = [gt.Row("unguided", "unguided", "cfg", 0.0), gt.Row("cfg-1", "cfg", "cfg", 1.0)]
    times = tm.time_rows(lane.base, rows, Sampling("ddim", 4, options={"eta": 0.0}), reps=2, batch=2)
    assert set(times) == {"unguided", "cfg-1"} and all(len(v) == 2 for v in times.values())
    assert all(w > 0 and c >= 0 for v in times.values() for w, c in v)
    md, numbers = tm.report({"unguided": [(1.0, 0.5), (2.0, 1.0)], "cfg-1": [(1.5, 1.0), (4.0, 1.5)]},
                            {"unguided": "u", "cfg-1": "c"})
    assert numbers["unguided"]["cpu_ratio"] == 1.0 and numbers["cfg-1"]["cpu_ratio"] == pytest.approx(1.75)
    assert numbers["cfg-1"]["cpu_ratio_range"] == [1.5, 2.0] and numbers["cfg-1"]["wall_ratio"] == pytest.approx(1.75)
    assert md.splitlines()[-1].startswith("| c | 2.750 | 1.250 | 1.75 (1.50-2.00) | 1.75 (1.50-2.00) |")
