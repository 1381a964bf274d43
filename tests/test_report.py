"""tools/report.py: the page of a few-shot and a zero-shot run of the tiny CLIP on synthetic Brain, checked
in a real browser (chromium through Playwright): no request outside the file, one row per test image, the
false-positive filter, decoded overlays, sorting; and its errors and thresholds without a browser."""

import json
import re

import numpy as np
import pytest
import torch
from browser import browser_page, chromium, screenshot_path
from conftest import TINY

import test_few
import test_zero
from dataset.synthetic import make_synthetic_bmad
from mvfa.config import configs
from tools import report

N = 3  # images per synthetic folder: 3 normal + 3 abnormal test images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A test_few record of synthetic Brain (MVFA's few-shot protocol), a test_zero one and a normal-only one
    (--support normal, standalone scores), with their --save_scores arrays, and the page of the three:
    (page, [(record, npz)])."""
    root = tmp_path_factory.mktemp("report")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model on a shared 2-core machine
    synth = make_synthetic_bmad(str(root / "synth"), n_per_split=N, seed=0, img_size=64, objs=("Brain",))
    model_cfg, _, precision, device = configs(vars(test_few.parser().parse_args(TINY)), protocol="few")
    torch.manual_seed(0)
    torch.save(model_cfg.build(device, precision).adapter_state(), root / "tiny.pth")
    common = [*TINY, "--obj", "Brain", "--data_path", synth.data, "--ckpt", str(root / "tiny.pth")]
    common += ["--cache_dir", str(root / "cache")]
    found, normal_only = [], ["--support", "normal", "--normalize", "support"]
    for module, extra, name in (
        (test_few, ["--shot", "2", "--seed_dir", synth.seed_root], "few"),
        (test_zero, [], "zero"),
        (test_few, ["--shot", "2", "--seed_dir", synth.seed_root, *normal_only], "normal"),
    ):
        out = root / name
        module.main([*common, *extra, "--out_dir", str(out), "--save_scores", str(out / "s.npz")])
        found.append((next(out.glob("*.json")), out / "s.npz"))
    torch.set_num_threads(threads)
    page = report.main([str(r) for r, _ in found] + ["--out", str(root / "page")])
    return page, found


def test_errors_name_the_file_and_the_fix(runs, tmp_path, capsys):
    _, [(record, _), *_] = runs
    cases = [
        ([str(tmp_path / "missing.json")], r"record .*missing\.json: no such file"),
        ([str(record), "--scores", str(tmp_path / "gone.npz")], r"scores .*gone\.npz of record .*: no such"),
    ]
    bare = json.loads(record.read_text())
    bare["args"]["save_scores"] = None
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    no_scores = r"record .*bare\.json has no --save_scores arrays: rerun .* --save_scores"
    cases.append(([str(tmp_path / "bare.json")], no_scores))
    for argv, pattern in cases:
        with pytest.raises(SystemExit) as e:
            report.main([*argv, "--out", str(tmp_path / "page")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.match(r"error: " + pattern, err), err
    assert not (tmp_path / "page").exists()


def test_thresholds_known_answers():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.6, 0.5, 0.9])
    # above 0.4: {0.6, 0.5, 0.9}, F1 = 2*2 / (3 + 2) = 0.8; above 0.5: {0.6, 0.9}, F1 = 0.5
    assert report.threshold_for(labels, scores, None, None) == (0.4, "F1-max on the test set")
    assert report.threshold_for(labels, scores, 0.55, None)[0] == 0.55
    assert report.threshold_for(labels, scores, None, 0.5)[0] == pytest.approx(0.4)  # median of the normals
    # every image abnormal is the best decision here: the threshold lies just below the lowest score
    t, _ = report.threshold_for(np.array([1, 1, 0]), np.array([0.2, 0.3, 0.25]), None, None)
    assert t < 0.2 and np.nextafter(t, 1) == 0.2


def test_pixel_curves_from_histograms_match_sklearn():
    from sklearn.metrics import auc, roc_auc_score

    rng = np.random.default_rng(0)
    masks = rng.random((4, 8, 8)) < 0.2
    maps = np.clip(rng.random((4, 8, 8)) * 0.7 + 0.3 * masks, 0, 0.998)
    maps = np.round(maps * report.PIXEL_BINS) / report.PIXEL_BINS + 0.5 / report.PIXEL_BINS  # bin centres
    curves = report.curves_from_histograms(*report.pixel_histograms(maps, masks.astype(np.uint8), chunk=3))
    fpr, tpr = curves["roc"]
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    recall, precision = curves["pr"]
    assert recall[-1] == 1 and precision[-1] == pytest.approx(masks.mean())


def test_pixel_curves_tell_standalone_scores_above_one_apart():
    """--normalize support keeps map values above the normal images' range: the bins span the maps' range,
    so a ranking above 1 still gives sklearn's AUROC (bins of [0, 1] would lump it into the top one)."""
    from sklearn.metrics import auc, roc_auc_score

    rng = np.random.default_rng(1)
    masks = rng.random((4, 8, 8)) < 0.2
    top = 3.0
    bins = np.minimum(rng.integers(0, 700, (4, 8, 8)) + 290 * masks, 998)  # bin 999 holds the top alone
    maps = (bins + 0.5) * top / report.PIXEL_BINS  # bin centres on [0, 3]
    maps[0, 0, 0] = top
    curves = report.curves_from_histograms(*report.pixel_histograms(maps, masks.astype(np.uint8), chunk=3))
    fpr, tpr = curves["roc"]
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert (maps > 1).mean() > 0.5


def test_page_in_a_browser(runs):
    chromium()  # skips with its reason when chromium or playwright is absent
    page_file, found = runs
    arrays = [np.load(npz) for _, npz in found]
    requests = []
    with browser_page() as page:
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        assert requests == [page_file.as_uri()]  # the page alone: every picture is inside it
        page.screenshot(path=screenshot_path("report.png"))  # the top: metrics and curves
        tables = page.locator("div.images")
        assert tables.count() == len(found) == 3
        for t, a in enumerate(arrays):
            box = tables.nth(t)
            rows = box.locator("tr.img:visible")
            assert rows.count() == len(a["labels"]) == 2 * N
            threshold = float(box.locator("input.threshold").input_value())
            scores = a["image_scores"].astype(np.float64)
            expected_fp = int(((scores > threshold) & (a["labels"] == 0)).sum())
            box.locator("input[value=fp]").check()
            assert rows.count() == expected_fp == int(box.locator(".n-fp").inner_text())
            assert all(row.get_attribute("data-label") == "0" for row in rows.all())
            box.locator("input[value=fn]").check()
            expected_fn = int(((scores <= threshold) & (a["labels"] == 1)).sum())
            assert rows.count() == expected_fn
            # a threshold chosen on the page: below every score, every normal image is a false positive
            box.locator("input.threshold").fill(str(scores.min() - 1))
            box.locator("input[value=fp]").check()
            assert rows.count() == N and box.locator(".n-fn").inner_text() == "0"
            box.locator("input[value=all]").check()
            header = box.locator("th[data-key=score]")
            header.click()
            shown = [float(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.score)")]
            assert shown == sorted(scores.tolist())
            header.click()
            shown = [float(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.score)")]
            assert shown == sorted(scores.tolist(), reverse=True)
        widths = page.locator("img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth)")
        assert len(widths) == 4 + 3 * 2 * N and all(w > 0 for w in widths)  # 4 curves, 18 overlays
        metrics = page.locator("#metrics").inner_text()
        for protocol in ("Brain few-shot k=2", "Brain zero-shot", "Brain normal-only k=2"):
            assert protocol in metrics, protocol
        assert "78.63" in metrics and "89.68" in metrics  # zero-shot Brain: paper AUC, implementation pAUC
    assert requests == [page_file.as_uri()]
