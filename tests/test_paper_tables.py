"""Tests of tools/paper_tables.py: the table maths on hand-made results (known answers), the runs and the
model it makes of its flags (those the scripts make of them), and one end-to-end run with a tiny random CLIP
on synthetic data (one dataset and one checkpoint missing)."""

import contextlib
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import SIZE, TINY

import test_few
import test_zero
import tools.paper_tables as pt
from CLIP import CLIP_Inplanted, create_model
from dataset import CLASS_NAMES
from dataset.synthetic import make_synthetic_bmad
from mvfa.config import ModelConfig, configs

LABELS = ["HIS", "ChestXray", "OCT17", "BrainMRI", "LiverCT", "RESC", "Average"]
# the averages the paper and the README print, in %: (image paper, image impl., pixel paper, pixel impl.)
PUBLISHED_AVERAGES = {"zero-shot": (80.43, 82.23, 93.39, 92.68), "few-shot": (88.97, 88.95, 98.67, 98.65)}


def _result(image: float, pixel: float | None = None) -> dict:
    return {"image_auroc": image, "image_ap": 0.5, **({} if pixel is None else {"pixel_auroc": pixel})}


def _all_six(image: float = 0.8, pixel: float = 0.9) -> dict:
    return {
        obj: _result(image, pixel if obj in ("Brain", "Liver", "Retina_RESC") else None)
        for obj in CLASS_NAMES
    }


@pytest.mark.parametrize("setting", ["zero-shot", "few-shot"])
def test_table_all_datasets_known_answer(setting):
    rows = pt.table(setting, _all_six())
    assert [r["dataset"] for r in rows] == LABELS
    average = rows[-1]
    published = (
        average["image_auroc_paper"],
        average["image_auroc_impl"],
        average["pixel_auroc_paper"],
        average["pixel_auroc_impl"],
    )
    # the published averages are the means of the published rows
    assert published == PUBLISHED_AVERAGES[setting]
    assert average["image_auroc_ours"] == 80.0 and average["pixel_auroc_ours"] == 90.0
    assert average["image_auroc_ours-paper"] == round(80.0 - published[0], 2)
    assert pt.average_notes(rows) == []


def test_table_rows_known_answer():
    ours = {
        "Histopathology": _result(0.8),
        "Retina_OCT2017": _result(0.9),
        "Brain": _result(0.912385, 0.87654),
        "Liver": None,
    }
    rows = {r["dataset"]: r for r in pt.table("zero-shot", ours)}
    assert rows["HIS"] == {
        "dataset": "HIS",
        "image_auroc_ours": 80.0,
        "image_auroc_paper": 77.90,
        "image_auroc_impl": 76.90,
        "image_auroc_ours-paper": 2.10,
        "image_auroc_ours-impl": 3.10,
        **{f"pixel_auroc_{p}": None for p in ("ours", "paper", "impl", "ours-paper", "ours-impl")},
    }
    brain = rows["BrainMRI"]  # ours rounded first: the differences are those of the printed numbers
    assert (brain["image_auroc_ours"], brain["image_auroc_ours-paper"], brain["image_auroc_ours-impl"]) == (
        91.24,
        12.61,
        11.44,
    )
    assert (brain["pixel_auroc_ours"], brain["pixel_auroc_ours-paper"], brain["pixel_auroc_ours-impl"]) == (
        87.65,
        -2.62,
        -2.03,
    )
    assert rows["LiverCT"]["image_auroc_ours"] is None and rows["LiverCT"]["image_auroc_ours-paper"] is None
    assert rows["LiverCT"]["pixel_auroc_paper"] == 97.85 and rows["ChestXray"]["image_auroc_ours"] is None
    # averages over the datasets we have (HIS, OCT17, Brain), the published columns over the same ones
    average = rows["Average"]
    # (80 + 90 + 91.24) / 3; (77.90 + 95.40 + 78.63) / 3; ...
    assert [average[f"image_auroc_{p}"] for p in ("ours", "paper", "impl", "ours-paper", "ours-impl")] == [
        87.08,
        83.98,
        84.03,
        3.10,
        3.05,
    ]
    assert (average["pixel_auroc_ours"], average["pixel_auroc_paper"], average["pixel_auroc_impl"]) == (
        87.65,
        90.27,
        89.68,
    )
    notes = pt.average_notes(list(rows.values()))
    assert notes == [
        "Average AUC: over the 3 of 6 datasets with our results (paper and implementation averaged "
        "over the same ones).",
        "Average pAUC: over the 1 of 3 datasets with our results (paper and implementation averaged "
        "over the same ones).",
    ]


def test_table_nothing_run_keeps_published_averages():
    rows = pt.table("few-shot", {})
    assert all(r["image_auroc_ours"] is None and r["image_auroc_ours-impl"] is None for r in rows)
    assert (rows[-1]["image_auroc_paper"], rows[-1]["pixel_auroc_impl"]) == (88.97, 98.65)


def test_markdown_lines_known_answer():
    md = pt.markdown(
        "zero-shot", pt.table("zero-shot", {"Histopathology": _result(0.779), "Brain": _result(1, 0.9)})
    )
    lines = md.splitlines()
    assert lines[0] == "## Zero-shot (AUROC, %)"
    assert lines[2].startswith(
        "| Dataset | AUC ours | AUC paper | AUC impl. | AUC ours-paper | AUC ours-impl. | pAUC"
    )
    assert lines[4] == "| HIS | 77.90 | 77.90 | 76.90 | +0.00 | +1.00 | - | - | - | - | - |"  # no '-0.00'
    assert (
        lines[7]
        == "| BrainMRI | 100.00 | 78.63 | 79.80 | +21.37 | +20.20 | 90.00 | 90.27 | 89.68 | -0.27 | +0.32 |"
    )
    few = pt.markdown("few-shot", pt.table("few-shot", _all_six()))
    assert few.splitlines()[-1].startswith(
        "- LiverCT AUC paper/impl. 81.18 equals the zero-shot implementation AUC"
    )


def test_cell():
    assert [
        pt.cell(None, "ours"),
        pt.cell(-0.0, "ours-paper"),
        pt.cell(-1.5, "ours-impl"),
        pt.cell(7.0, "paper"),
    ] == ["-", "+0.00", "-1.50", "7.00"]


def test_setting_notes_name_the_flags_that_change_numbers():
    assert pt.setting_notes(pt.parser().parse_args([])) == []
    assert pt.setting_notes(pt.parser().parse_args(["--precision", "auto", "--seed", "3"])) == []
    args = pt.parser().parse_args(["--memory_no_cls", "--quick_gelu", "--precision", "fp32"])
    assert pt.setting_notes(args) == [
        "run with --quick_gelu --memory_no_cls --precision fp32: not the reference's settings"
    ]


def test_run_configs_are_the_scripts_runs():
    args = pt.parser().parse_args(
        [
            "--objs",
            "Liver",
            "Brain",
            "--zero_dir",
            "z",
            "--precision",
            "bf16",
            "--features_list",
            "3",
            "6",
            "--quick_gelu",
            "--seed_dir",
            "s",
            "--out",
            "o",
            "--memory_no_cls",
            "--seed",
            "7",
        ]
    )
    runs = pt.run_configs(args)
    assert list(runs) == [
        ("zero-shot", "Brain"),
        ("zero-shot", "Liver"),
        ("few-shot", "Brain"),
        ("few-shot", "Liver"),
        ("normal-only", "Brain"),
        ("normal-only", "Liver"),
    ]
    zero, few = runs["zero-shot", "Liver"], runs["few-shot", "Liver"]
    assert (zero.protocol, zero.obj, zero.save_path, zero.checkpoint) == (
        "zero",
        "Liver",
        "z",
        Path("z/Liver.pth"),
    )
    # the first support list; test_few.py's default --save_path
    assert (few.protocol, few.shot, few.iterate, few.seed_dir, few.save_path) == (
        "few",
        4,
        0,
        "s",
        "./ckpt/few-shot/",
    )
    assert (
        few.memory_no_cls
        and not pt.run_configs(pt.parser().parse_args([]))["few-shot", "Brain"].memory_no_cls
    )
    assert zero.out_dir == few.out_dir == str(Path("o") / "runs")
    assert zero.seed == few.seed == 7  # typed as the scripts' parsers type it
    default_batch = test_zero.parser().parse_args([]).batch_size
    # defaults
    assert (zero.data_path, zero.batch_size, zero.clip_normalize) == ("./data/", default_batch, False)
    # each run is the one test_zero.py / test_few.py make of the same flags (test_few: of its first draw only)
    out_dir = ["--out_dir", str(Path("o") / "runs")]
    handed_on = ["--precision", "bf16", "--features_list", "3", "6", "--quick_gelu", "--seed", "7"]
    _, own_zero, _, _ = configs(
        vars(test_zero.parser().parse_args(["--obj", "Liver", "--save_path", "z", *out_dir, *handed_on])),
        protocol="zero",
    )
    few_flags = ["--obj", "Liver", "--shot", "4", "--iterate", "0", "--seed_dir", "s", "--memory_no_cls"]
    _, own_few, _, _ = configs(test_few.parsed([*few_flags, *out_dir, *handed_on]), protocol="few")
    assert zero == own_zero and few == dataclasses.replace(own_few, iterate=0)
    # normal-only: test_few.py --support normal, the zero-shot adapters; its records in a folder of their own
    normal_out = ["--out_dir", str(Path("o") / "runs" / "normal-only")]
    normal_flags = [*few_flags, "--support", "normal", "--save_path", "z", *normal_out, *handed_on]
    _, own_normal, _, _ = configs(test_few.parsed(normal_flags), protocol="few")
    normal = runs["normal-only", "Liver"]
    assert normal == dataclasses.replace(own_normal, iterate=0) and normal.checkpoint == Path("z/Liver.pth")
    default = pt.run_configs(pt.parser().parse_args([]))["normal-only", "Brain"]
    own_default = configs(test_few.parsed(["--obj", "Brain", "--support", "normal"]), protocol="few")[1]
    assert default.checkpoint == own_default.checkpoint == Path("./ckpt/zero-shot/Brain.pth")


def test_the_shared_model_is_the_scripts_model(tiny, monkeypatch):
    """All runs share one model, built once from the flags handed on, as the scripts would build theirs; the
    values are those of the scripts' parsers (types included)."""
    root, flags = tiny
    made, calls = [], []
    monkeypatch.setattr(ModelConfig, "build", lambda self, device, precision: made.append(self) or "model")
    monkeypatch.setattr(pt, "test_run", lambda *a: calls.append(a) or {"image_auroc": 0.5})
    args = pt.parser().parse_args(
        [*flags, "--objs", "Brain", "--precision", "bf16", "--quick_gelu", "--out", str(root / "unused")]
    )
    results, _ = pt.run_all(args)
    assert results == {
        "zero-shot": {"Brain": {"image_auroc": 0.5}},
        "few-shot": {"Brain": {"image_auroc": 0.5}},
        "normal-only": {"Brain": {"image_auroc": 0.5}},
    }
    own, _, precision, _ = configs(
        vars(
            test_zero.parser().parse_args(
                ["--obj", "Brain", *flags[:2], *TINY, "--precision", "bf16", "--quick_gelu"]
            )
        ),
        protocol="zero",
    )
    assert made == [own] and own.features_list == (3, 6, 9, 12) and own.img_size == SIZE and own.quick_gelu
    assert [(model, model_cfg, run.protocol, p) for model, model_cfg, run, p in calls] == [
        ("model", own, "zero", precision),
        ("model", own, "few", precision),
        ("model", own, "few", precision),
    ]
    assert [run.support for _, _, run, _ in calls] == ["mvfa", "mvfa", "normal"]
    assert precision.name == "bf16"


def test_bad_precision_stops_before_any_work(tmp_path, capsys):
    """--precision is checked (as the scripts check it) before any model work or output."""
    with pytest.raises(SystemExit) as info:
        pt.main(["--precision", "fp8", "--data_path", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "fp8" in err
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: on a shared 2-core CPU, two spinning threads per process
    make tiny models ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic data without Chest, tiny adapter checkpoints without few-shot Liver: (root, flags)."""
    root = tmp_path_factory.mktemp("paper_tables")
    paths = make_synthetic_bmad(
        str(root),
        n_per_split=4,
        seed=0,
        img_size=SIZE,
        objs=[o for o in CLASS_NAMES if o != "Chest"],
        shots=(4,),
    )
    clip = create_model("demo-tiny", SIZE, "none")
    for setting in ("zero-shot", "few-shot"):
        (root / setting).mkdir()
        for i, obj in enumerate(CLASS_NAMES):
            if (setting, obj) != ("few-shot", "Liver"):
                torch.manual_seed(i)
                torch.save(CLIP_Inplanted(clip, (3, 6, 9, 12)).adapter_state(), root / setting / f"{obj}.pth")
    flags = [
        "--data_path",
        paths.data,
        "--seed_dir",
        paths.seed_root,
        "--zero_dir",
        str(root / "zero-shot"),
        "--few_dir",
        str(root / "few-shot"),
        *TINY,
    ]
    return root, flags


@pytest.fixture(scope="module")
def tiny_run(tiny):
    """One end-to-end run of the 6 x 2 table. Returns (out folder, Markdown)."""
    root, flags = tiny
    with one_thread():
        text = pt.main([*flags, "--out", str(root / "out")])
    assert text == (root / "out" / "tables.md").read_text()  # main returns the Markdown it wrote
    return root / "out", text


OBJ_OF = {
    "HIS": "Histopathology",
    "ChestXray": "Chest",
    "OCT17": "Retina_OCT2017",
    "BrainMRI": "Brain",
    "LiverCT": "Liver",
    "RESC": "Retina_RESC",
}


def _recorded_metrics(runs: Path, script: str) -> dict[str, dict]:
    """obj -> the metrics of the JSON run record `script` wrote for it (one record per run)."""
    found = {}
    for path in runs.glob(f"{script}_*.json"):
        record = json.loads(path.read_text())
        assert record["script"] == script and record["args"]["obj"] not in found
        found[record["args"]["obj"]] = record["metrics"]
    return found


def _parse(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def _markdown_table(md: str, title: str) -> list[list[str]]:
    lines = md.splitlines()
    start = lines.index(title) + 2
    rows = [line.strip("|").split("|") for line in lines[start : start + 9]]
    return [[c.strip() for c in row] for row in rows]


FEW_SHOT_TITLE = "## Few-shot, k = 4, support draw --iterate 0 (lines n-0/a-0 of 4-shot.txt) (AUROC, %)"


@pytest.mark.parametrize(
    "setting,title", [("zero-shot", "## Zero-shot (AUROC, %)"), ("few-shot", FEW_SHOT_TITLE)]
)
def test_end_to_end_tables(tiny_run, setting, title):
    out, md = tiny_run
    table = _markdown_table(md, title)
    assert table[0][0] == "Dataset" and set(table[1]) == {":---", "---:"}
    body = table[2:]
    assert [row[0] for row in body] == LABELS
    with open(out / f"{setting.replace('-', '_')}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dataset", *pt.COLUMNS] and rows[1:] == body  # the CSV holds the Markdown's cells
    values = [dict(zip(pt.COLUMNS, map(_parse, row[1:]))) for row in body]  # every cell parses
    recorded = _recorded_metrics(out / "runs", "test_zero" if setting == "zero-shot" else "test_few")
    for label, row, cells in zip(LABELS, values, body):
        for metric in ("image_auroc", "pixel_auroc"):
            ours, paper, impl = (row[f"{metric}_{p}"] for p in ("ours", "paper", "impl"))
            if ours is None:
                assert row[f"{metric}_ours-paper"] is None and row[f"{metric}_ours-impl"] is None
            else:
                if label != "Average":  # the cell: 100 x the run's recorded AUROC, to 2 decimals
                    expected = round(100 * recorded[OBJ_OF[label]][metric], 2)
                    assert cells[1 + pt.COLUMNS.index(f"{metric}_ours")] == f"{expected:.2f}", (label, metric)
                assert row[f"{metric}_ours-paper"] == pytest.approx(ours - paper, abs=1e-9)
                assert row[f"{metric}_ours-impl"] == pytest.approx(ours - impl, abs=1e-9)
        has_pixel = label in ("BrainMRI", "LiverCT", "RESC", "Average")
        assert (row["pixel_auroc_paper"] is not None) == has_pixel
    missing = {"ChestXray"} | ({"LiverCT"} if setting == "few-shot" else set())
    assert {label for label, row in zip(LABELS, values) if row["image_auroc_ours"] is None} == missing
    assert set(recorded) == {OBJ_OF[label] for label in LABELS[:-1] if label not in missing}
    have = [row["image_auroc_ours"] for label, row in zip(LABELS[:-1], values) if label not in missing]
    assert values[-1]["image_auroc_ours"] == pytest.approx(round(sum(have) / len(have), 2), abs=1e-9)


def test_end_to_end_notes_and_records(tiny_run):
    out, md = tiny_run
    notes = md.split("## Notes")[1]
    assert "Chest zero-shot: not run, dataset folder not found" in notes
    assert "Liver few-shot: not run, adapter checkpoint not found" in notes and "Liver zero-shot" not in notes
    assert "over the 5 of 6 datasets" in md and "over the 4 of 6 datasets" in md
    records = sorted(p.name.split("_2")[0] for p in (out / "runs").glob("*.json"))  # one record per run made
    assert len(records) == 9 and records.count("test_zero_Brain") == 1 and "test_few_Liver" not in records


def test_shared_model_gives_the_scripts_own_numbers(tiny, tiny_run):
    """A run of test_zero.py on its own (its own model) prints the numbers of the table's Brain row."""
    root, flags = tiny
    with one_thread():
        alone = test_zero.main(
            [
                "--obj",
                "Brain",
                "--save_path",
                str(root / "zero-shot"),
                "--out_dir",
                str(root / "alone"),
                *flags[:2],
                *TINY,
            ]
        )
    with open(tiny_run[0] / "zero_shot.csv", newline="", encoding="utf-8") as f:
        brain = next(row for row in csv.DictReader(f) if row["dataset"] == "BrainMRI")
    assert brain["image_auroc_ours"] == f"{100 * alone['image_auroc']:.2f}"
    assert brain["pixel_auroc_ours"] == f"{100 * alone['pixel_auroc']:.2f}"


def test_strict_stops_before_any_work(tiny, tmp_path, capsys):
    _, flags = tiny
    with pytest.raises(SystemExit) as info:
        pt.main([*flags, "--strict", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Chest zero-shot: dataset folder not found") and "Chest_AD" in err
    assert not (tmp_path / "out").exists()


NORMAL_TITLE = f"## {pt.TITLES['normal-only']} (AUROC, %)"


def test_end_to_end_normal_only_table_beside_the_others(tiny_run):
    """The normal-only table: its cells are 100 x the AUROCs of test_few.py --support normal's records (in
    runs/normal-only/), beside the few-shot and zero-shot tables' own cells; the CSV holds the Markdown's."""
    out, md = tiny_run
    body = _markdown_table(md, NORMAL_TITLE)[2:]
    with open(out / "normal_only.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dataset", *pt.NORMAL_COLUMNS] and rows[1:] == body
    recorded = _recorded_metrics(out / "runs" / "normal-only", "test_few")
    # Chest: no data; Liver: its zero-shot adapters exist (only its few-shot ones are missing)
    assert set(recorded) == set(CLASS_NAMES) - {"Chest"}
    assert all(record["args"]["support"] == "normal" for record in _records(out / "runs" / "normal-only"))
    tables = {}
    for setting in ("zero-shot", "few-shot"):
        with open(out / f"{setting.replace('-', '_')}.csv", newline="", encoding="utf-8") as f:
            tables[setting] = {row["dataset"]: row for row in csv.DictReader(f)}
    for label, cells in zip(LABELS[:-1], body):
        row = dict(zip(pt.NORMAL_COLUMNS, cells[1:]))
        for metric in ("image_auroc", "pixel_auroc"):
            ours = recorded.get(OBJ_OF[label], {}).get(metric)
            paper = tables["zero-shot"][label][f"{metric}_paper"]
            expected = "-" if ours is None or paper == "-" else f"{round(100 * ours, 2):.2f}"
            assert row[f"{metric}_normal-only_ours"] == expected, (label, metric)
            for setting in ("zero-shot", "few-shot"):
                for part in ("ours", "paper"):
                    assert row[f"{metric}_{setting}_{part}"] == tables[setting][label][f"{metric}_{part}"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in folder.glob("*.json")]
