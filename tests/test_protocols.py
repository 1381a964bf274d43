"""Checkpoint-selection protocols of train_few / train_zero (--select test | val | last): which data each
phase reads, when checkpoints are saved and which weights they hold.
Helpers and fixtures come from test_scripts.py."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from test_scripts import (
    adapter_state,
    call,
    ckpt_state,
    expected_lines,
    load_ckpt,
    only_record,
    result_lines,
    same_weights,
    script_args,
    split_files,
    split_of,
)

import train_few
import train_zero
from mvfa import training

pytestmark = pytest.mark.usefixtures("one_thread")


def valid_files(data, obj: str) -> list[str]:
    root = Path(data) / f"{obj}_AD" / "valid"
    return sorted(str(p) for p in root.glob("*/*/*"))


def first_test_read(log: list, folder: str) -> int:
    return next(i for i, (_, path) in enumerate(log) if split_of(path) == (folder, "test"))


def fake_step(model, *args, **kwargs) -> float:
    """Stands in for mvfa.training.train_step: moves every adapter weight a little,
    so each step's weights differ."""
    with torch.no_grad():
        for p in model.seg_adapters.parameters():
            p.add_(1e-3)
        for p in model.det_adapters.parameters():
            p.sub_(1e-3)
    return 0.5


class Spies:
    """Wraps the training loop's save_checkpoint and a training script's evaluate_set (every selection and
    test pass), recording each call with the weights at that time; `scripted` (a list of metric dicts), if
    given, replaces the evaluation's results in turn."""

    def __init__(self, monkeypatch, script, scripted: list | None = None):
        self.saves, self.evals, self.scripted = [], [], scripted
        save, evaluate = training.save_checkpoint, script.evaluate_set

        def spy_save(model, path, extras):
            self.saves.append((extras, adapter_state(model)))
            save(model, path, extras)

        def spy_evaluate(model, dataset, *rest, **kwargs):
            self.evals.append((dataset, adapter_state(model)))
            if self.scripted is not None:
                return self.scripted.pop(0), None  # (result, collected): the scripts use the result only
            return evaluate(model, dataset, *rest, **kwargs)

        monkeypatch.setattr(training, "save_checkpoint", spy_save)
        monkeypatch.setattr(script, "evaluate_set", spy_evaluate)


def splits(dataset) -> set:
    return {split_of(path) for path, _, _ in dataset.items}


# ---------------------------------------------------------------- few-shot


def test_fewshot_val_never_reads_the_test_set_before_the_final_pass(synth, tmp_path, reads, monkeypatch):  # noqa: F811
    spies = Spies(monkeypatch, train_few)  # records, and runs the real evaluation
    out = call(
        train_few,
        script_args(
            synth.data,
            tmp_path,
            "Brain",
            "--shot",
            "2",
            "--epoch",
            "2",
            "--select",
            "val",
            seed_dir=synth.seed_root,
        ),
    )
    start = first_test_read(reads, "Brain_AD")
    before, final = [p for _, p in reads[:start]], [p for _, p in reads[start:]]
    # the final pass reads the test set once, at the end
    assert sorted(final) == split_files(synth.data, "Brain")
    lists = (Path(synth.seed_root) / "Brain" / "2-shot.txt").read_text().splitlines()  # n-0: line, a-0: line
    valid = Path(synth.data) / "Brain_AD" / "valid"
    support = {str(valid / "good" / "img" / n) for n in lists[0].split()[1:]} | {
        str(valid / "Ungood" / sub / n) for n in lists[1].split()[1:] for sub in ("img", "anomaly_mask")
    }
    # support set and selection read the valid split only: the support once, the held-out pair once per epoch
    assert Counter(before) == {p: 1 if p in support else 2 for p in valid_files(synth.data, "Brain")}
    lines = out.splitlines()
    assert [line.split(" : ")[0] for line in lines if line.startswith("[valid] ")] == [
        "[valid] Brain pAUC",
        "[valid] Brain AUC",
    ] * 2
    head = lines.index("test set:")
    record = only_record(tmp_path / "results")
    assert lines[head + 1 : head + 3] == expected_lines("Brain", record["metrics"], fewshot=True)
    ckpt = load_ckpt(tmp_path / "ckpt" / "Brain.pth")
    # tested: the saved
    assert ckpt["selection"] == "val" and same_weights(ckpt_state(ckpt), spies.evals[-1][1])
    assert [splits(d) for d, _ in spies.evals] == [{("Brain_AD", "valid")}] * 2 + [{("Brain_AD", "test")}]


def test_fewshot_last_saves_once_with_the_final_weights(synth, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(training, "train_step", fake_step)
    spies = Spies(monkeypatch, train_few)
    out = call(
        train_few,
        script_args(
            synth.data,
            tmp_path,
            "Brain",
            "--shot",
            "2",
            "--epoch",
            "3",
            "--select",
            "last",
            seed_dir=synth.seed_root,
        ),
    )
    assert (
        len(spies.saves) == 1 and spies.saves[0][0]["epoch"] == 2 and spies.saves[0][0]["selection"] == "last"
    )
    [(dataset, final)] = spies.evals  # no selection pass, one test pass with the final weights
    assert splits(dataset) == {("Brain_AD", "test")}
    ckpt = load_ckpt(tmp_path / "ckpt" / "Brain.pth")
    assert same_weights(ckpt_state(ckpt), final) and ckpt["epoch"] == 2
    assert out.splitlines()[:4] == [
        "epoch 0 loss 0.5000",
        "epoch 1 loss 0.5000",
        "epoch 2 loss 0.5000",
        "test set:",
    ]


def test_fewshot_test_selection_saves_on_strict_improvement(synth, tmp_path, monkeypatch):  # noqa: F811
    """The reference's few-shot selection: after each epoch, on the test set;
    saved when pAUC + AUC > the best so far."""
    # sums 1.25, 1.25 (equal: no save), 1.5, 0.5
    scores = [(0.5, 0.75), (0.75, 0.5), (0.75, 0.75), (0.25, 0.25)]
    scripted = [{"image_auroc": a, "pixel_auroc": p, "image_scores": [0.0] * 6} for a, p in scores]
    monkeypatch.setattr(training, "train_step", fake_step)
    spies = Spies(monkeypatch, train_few, list(scripted))
    out = call(
        train_few,
        script_args(synth.data, tmp_path, "Brain", "--shot", "2", "--epoch", "4", seed_dir=synth.seed_root),
    )
    assert [extras["epoch"] for extras, _ in spies.saves] == [0, 2]
    assert (
        all(splits(dataset) == {("Brain_AD", "test")} for dataset, _ in spies.evals) and len(spies.evals) == 4
    )
    for (_, saved), (_, evaluated) in zip(spies.saves, [spies.evals[0], spies.evals[2]]):
        assert same_weights(saved, evaluated)  # the weights that were scored are the weights saved
    ckpt = load_ckpt(tmp_path / "ckpt" / "Brain.pth")
    assert ckpt["epoch"] == 2 and same_weights(ckpt_state(ckpt), spies.evals[2][1])
    assert not same_weights(ckpt_state(ckpt), spies.evals[3][1])
    assert result_lines(out, "Brain") == [
        line for r in scripted for line in expected_lines("Brain", r, fewshot=True)
    ]
    assert only_record(tmp_path / "results")["metrics"] == scripted[2]


# ---------------------------------------------------------------- zero-shot


def test_zeroshot_test_selection_saves_on_non_strict_improvement(synth, tmp_path, monkeypatch):  # noqa: F811
    """The reference's zero-shot selection: evaluated before steps 0, n, 2n, ... (n = groups // 5) on the test
    set; saved when the score is >= the best so far."""
    # two epochs of 5 groups (one per other dataset)
    aucs = [0.5, 0.5, 0.25, 0.75, 0.75, 0.75, 0.5, 0.5, 0.5, 0.5]
    scripted = [{"image_auroc": a, "image_scores": [0.0] * 6} for a in aucs]
    monkeypatch.setattr(training, "train_step", fake_step)
    spies = Spies(monkeypatch, train_zero, list(scripted))
    out = call(train_zero, script_args(synth.data, tmp_path, "Chest", "--epoch", "2", "--batch_size", "6"))
    saved_at = [(0, 0), (0, 1), (0, 3), (0, 4), (1, 0)]
    assert [(e["epoch"], e["batch"]) for e, _ in spies.saves] == saved_at
    assert [line for line in out.splitlines() if line.startswith("best")] == [
        f"best epoch found: epoch {e} batch {b}" for e, b in saved_at
    ]
    assert len(spies.evals) == 10 and all(splits(d) == {("Chest_AD", "test")} for d, _ in spies.evals)
    ckpt = load_ckpt(tmp_path / "ckpt" / "Chest.pth")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0) and same_weights(ckpt_state(ckpt), spies.evals[5][1])
    assert not same_weights(spies.evals[4][1], spies.evals[5][1])  # a step happened in between
    assert only_record(tmp_path / "results")["metrics"] == scripted[5]


def test_zeroshot_val_uses_the_valid_split_only(synth, tmp_path, reads, monkeypatch):  # noqa: F811
    spies = Spies(monkeypatch, train_zero)
    out = call(
        train_zero,
        script_args(synth.data, tmp_path, "Brain", "--epoch", "1", "--batch_size", "6", "--select", "val"),
    )
    # selection passes, then the test pass
    evaluated = [p for module, p in reads if module == "dataset.medical_few"]
    start = next(i for i, p in enumerate(evaluated) if split_of(p)[1] == "test")
    assert sorted(evaluated[start:]) == split_files(synth.data, "Brain")
    # 5 selection passes
    assert Counter(evaluated[:start]) == dict.fromkeys(valid_files(synth.data, "Brain"), 5)
    trained = {split_of(p) for module, p in reads if module == "dataset.medical_zero"}
    # training: the others' test splits, never their valid splits, as the reference trains
    assert trained == {
        (f"{o}_AD", "test") for o in ("Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")
    }
    lines = out.splitlines()
    assert sum(line.startswith("[valid] Brain ") for line in lines) == 10
    head = lines.index("test set:")
    record = only_record(tmp_path / "results")
    assert lines[head + 1 : head + 3] == expected_lines("Brain", record["metrics"], fewshot=False)
    ckpt = load_ckpt(tmp_path / "ckpt" / "Brain.pth")
    assert ckpt["selection"] == "val" and same_weights(ckpt_state(ckpt), spies.evals[-1][1])
    assert [splits(d) for d, _ in spies.evals] == [{("Brain_AD", "valid")}] * 5 + [{("Brain_AD", "test")}]


def test_zeroshot_last_saves_once_with_the_final_weights(synth, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(training, "train_step", fake_step)
    spies = Spies(monkeypatch, train_zero)
    call(
        train_zero,
        script_args(synth.data, tmp_path, "Chest", "--epoch", "2", "--batch_size", "6", "--select", "last"),
    )
    assert [(e["epoch"], e["selection"]) for e, _ in spies.saves] == [(1, "last")]
    [(dataset, final)] = spies.evals
    assert splits(dataset) == {("Chest_AD", "test")}
    assert same_weights(ckpt_state(load_ckpt(tmp_path / "ckpt" / "Chest.pth")), final)


def test_fewshot_score_never_above_zero_saves_nothing_and_says_so(synth, tmp_path, monkeypatch):  # noqa: F811
    """An AUROC of 0 in every epoch (tiny test sets): no checkpoint, as the reference,
    and a run record without one."""
    monkeypatch.setattr(training, "train_step", fake_step)
    spies = Spies(
        monkeypatch, train_few, [{"image_auroc": 0.0, "pixel_auroc": 0.0, "image_scores": [0.0] * 6}] * 2
    )
    out = call(
        train_few,
        script_args(synth.data, tmp_path, "Brain", "--shot", "2", "--epoch", "2", seed_dir=synth.seed_root),
    )
    target = tmp_path / "ckpt" / "Brain.pth"
    assert spies.saves == [] and not target.exists()
    assert (
        out.splitlines()[-1]
        == f"no checkpoint saved: the selection score never rose above 0; {target} was not written"
    )
    assert "adapters" not in only_record(tmp_path / "results")["files"]
