"""Tests of the dataset package: reference list order and transforms, support lists, pairing, errors, and the
synthetic data of dataset/synthetic.py."""

import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_matches_probe
from PIL import Image
from torchvision import transforms

import dataset
from dataset import CLASS_NAMES, DATASETS, check_obj, list_images, load_image, load_mask
from dataset.medical_few import DEFAULT_SEED_ROOT, MedDataset, MedTestDataset, load_support, read_support_list
from dataset.medical_zero import MedTrainDataset
from dataset.synthetic import make_synthetic_bmad

REPO = Path(__file__).resolve().parents[1]
SMALL = 48  # image size of the synthetic fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """All six synthetic datasets, 6 images per folder, SMALL px, lists for k = 2 and 4 (and none for 8)."""
    return make_synthetic_bmad(
        str(tmp_path_factory.mktemp("synth")), n_per_split=6, seed=0, img_size=SMALL, shots=(2, 4, 8)
    )


@pytest.fixture
def brain(tmp_path):
    """A fresh synthetic Brain dataset that a test may damage."""
    return make_synthetic_bmad(
        str(tmp_path / "b"), n_per_split=3, seed=1, img_size=32, objs=("Brain",), shots=(2,)
    )


def _names(paths):
    return [os.path.basename(p) for p in paths]


# ---------------------------------------------------------------- table, transforms, reference data


def test_table_and_check_obj():
    assert tuple(DATASETS) == CLASS_NAMES
    assert [k for k, d in DATASETS.items() if d.has_masks] == ["Brain", "Liver", "Retina_RESC"]
    assert check_obj("Chest") == "Chest"
    with pytest.raises(
        ValueError,
        match="unknown dataset 'brain': choose one of Brain, Liver, Retina_RESC, "
        "Retina_OCT2017, Chest, Histopathology",
    ):
        check_obj("brain")


@pytest.mark.parametrize("obj", ["Brain", "Chest"])
def test_reference_test_list_order_labels_masks(reference_assets, obj):
    data = str(reference_assets / "data")
    folder, has_masks, _ = DATASETS[obj]
    ds = MedTestDataset(data, obj, img_size=32)
    good, bad = (os.path.join(data, folder, "test", s, "img") for s in ("good", "Ungood"))
    assert [p for p, _, _ in ds.items] == (
        [os.path.join(good, n) for n in sorted(os.listdir(good))]
        + [os.path.join(bad, n) for n in sorted(os.listdir(bad))]
    )
    assert [y for _, y, _ in ds.items] == [0] * 6 + [1] * 6
    masks = [m for _, _, m in ds.items]
    assert masks[:6] == [None] * 6
    if has_masks:  # both reference rules: 'img' -> 'anomaly_mask' (few-shot) and sorted position (zero-shot)
        assert masks[6:] == [data + p[len(data) :].replace("img", "anomaly_mask") for p, _, _ in ds.items[6:]]
        mdir = os.path.join(data, folder, "test", "Ungood", "anomaly_mask")
        assert masks[6:] == [os.path.join(mdir, n) for n in sorted(os.listdir(mdir))]
    else:
        assert masks[6:] == [None] * 6
    img, y, mask = ds[7]
    assert img.shape == (3, 32, 32) and y == 1 and mask.shape == (1, 32, 32)
    assert (mask.sum() > 0) == has_masks
    assert torch.equal(ds[0][2], torch.zeros(1, 32, 32))


def test_golden_image_exact(reference_assets, goldens):
    """The reference's tensor of the goldens' image (kept as a probe): the same values at the probe's
    positions, the same sum and norm."""
    path = str(reference_assets / "data" / goldens["image_file"])
    assert_matches_probe(load_image(path)[None], goldens["image"])
    obj = goldens["image_file"].split("_AD")[0]
    ds = MedTestDataset(str(reference_assets / "data"), obj)
    i = [p for p, _, _ in ds.items].index(path)
    assert_matches_probe(ds[i][0][None], goldens["image"])


def test_transforms_equal_torchvision_pipeline(synth):
    """The reference's transforms: Resize((s, s), BICUBIC/NEAREST) + ToTensor on the PIL image,
    here with a real 48 -> 30 resize."""
    bad = os.path.join(synth.data, "Histopathology_AD", "test", "Ungood", "img", "00001.png")
    mask = os.path.join(synth.data, "Liver_AD", "test", "Ungood", "anomaly_mask", "00001.png")
    tf_img = transforms.Compose(
        [transforms.Resize((30, 30), transforms.InterpolationMode.BICUBIC), transforms.ToTensor()]
    )
    tf_mask = transforms.Compose(
        [transforms.Resize((30, 30), transforms.InterpolationMode.NEAREST), transforms.ToTensor()]
    )
    assert torch.equal(load_image(bad, 30), tf_img(Image.open(bad).convert("RGB")))
    m = load_mask(mask, 30)
    assert torch.equal(m, tf_mask(Image.open(mask).convert("L")))
    assert m.dtype == torch.float32 and set(m.unique().tolist()) == {0.0, 1.0}


def test_known_values_and_clip_normalize(tmp_path):
    p = str(tmp_path / "c.png")
    Image.fromarray(np.tile(np.array([255, 0, 51], np.uint8), (4, 4, 1))).save(p)
    x = load_image(p, 4)
    assert x.shape == (3, 4, 4) and torch.equal(
        x[:, 0, 0], torch.tensor([1.0, 0.0, 51 / 255], dtype=torch.float32)
    )
    z = load_image(p, 4, normalize=True)
    want = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), dataset.CLIP_MEAN, dataset.CLIP_STD)]
    assert torch.allclose(z[:, 2, 3], torch.tensor(want), atol=1e-6)
    q = str(tmp_path / "m.png")
    Image.fromarray(np.array([[0, 255], [128, 0]], np.uint8)).save(q)
    m = load_mask(q, 4)  # nearest: each pixel becomes a 2 x 2 block
    assert torch.equal(m[0, 2:, :2], torch.full((2, 2), 128 / 255)) and torch.equal(
        m[0, :2, 2:], torch.ones(2, 2)
    )


# ---------------------------------------------------------------- support sets


@pytest.mark.parametrize("obj", ["Brain", "Retina_OCT2017"])
@pytest.mark.parametrize("iterate", [0, 1, 2])
def test_support_from_reference_lists(reference_assets, obj, iterate):
    data, seeds = str(reference_assets / "data"), str(reference_assets / "dataset" / "fewshot_seed")
    with open(os.path.join(seeds, obj, "4-shot.txt")) as f:
        table = {line.split()[0]: line.split()[1:] for line in f.read().splitlines() if line.strip()}
    sup = load_support(data, obj, img_size=32, shot=4, iterate=iterate, seed_root=seeds)
    assert sup.normal_files == table[f"n-{iterate}:"][:4] and sup.abnormal_files == table[f"a-{iterate}:"][:4]
    valid = os.path.join(data, DATASETS[obj].folder, "valid")
    assert sup.normal.shape == sup.abnormal.shape == (4, 3, 32, 32)
    for j in range(4):
        assert torch.equal(
            sup.normal[j], load_image(os.path.join(valid, "good", "img", sup.normal_files[j]), 32)
        )
        assert torch.equal(
            sup.abnormal[j], load_image(os.path.join(valid, "Ungood", "img", sup.abnormal_files[j]), 32)
        )
    if DATASETS[obj].has_masks:
        masks = [load_mask(os.path.join(valid, "Ungood", "anomaly_mask", n), 32) for n in sup.abnormal_files]
        assert torch.equal(sup.abnormal_masks, torch.stack(masks))
    else:
        assert sup.abnormal_masks is None


def test_support_list_parsing_and_errors(tmp_path):
    (tmp_path / "Chest").mkdir()
    (tmp_path / "Chest" / "3-shot.txt").write_text(
        "a-0: x.png y.png\nn-0: a.png b.jpg c.jpeg d.PNG e.png f.png\nn-0: z.png z.png z.png"
    )
    with pytest.raises(
        ValueError, match=r"3-shot.txt has 2 image names after 'a-0:', fewer than a 3-shot support set needs"
    ):
        read_support_list("Chest", 3, 0, str(tmp_path))
    (tmp_path / "Chest" / "3-shot.txt").write_text(
        "a-0: x.png y.jpeg w.png v.png\nn-0: a.png b.jpg c.jpeg d.PNG e.png f.png\nn-0: z.png z.png z.png\n"
    )
    normal, abnormal = read_support_list("Chest", 3, 0, str(tmp_path))
    assert normal == ["a.png", "c.jpeg", "e.png"] and abnormal == ["x.png", "y.jpeg", "w.png"]
    with pytest.raises(
        ValueError, match=r"has no line 'n-1:'.*MediaBrain-SJTU/MVFA-AD.*iterate -1, with a seed"
    ):
        read_support_list("Chest", 3, 1, str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"Chest/2-shot.txt.*dataset/fewshot_seed/.*iterate -1, with a seed"
    ):
        read_support_list("Chest", 2, 0, str(tmp_path))


def test_support_lists_found_relative_to_repo_not_cwd(tmp_path, monkeypatch):
    assert Path(DEFAULT_SEED_ROOT) == REPO / "dataset" / "fewshot_seed"
    decoy = tmp_path / "dataset" / "fewshot_seed" / "Brain"
    decoy.mkdir(parents=True)
    (decoy / "4-shot.txt").write_text("n-0: d1.png d2.png d3.png d4.png\na-0: d1.png d2.png d3.png d4.png")
    monkeypatch.chdir(tmp_path)
    if (REPO / "dataset" / "fewshot_seed" / "Brain" / "4-shot.txt").is_file():  # the paper's lists were added
        assert read_support_list("Brain", 4, 0)[0] != ["d1.png", "d2.png", "d3.png", "d4.png"]
    else:
        with pytest.raises(FileNotFoundError, match=str(REPO / "dataset" / "fewshot_seed" / "Brain")):
            read_support_list("Brain", 4, 0)


def test_drawn_support(synth):
    good = os.path.join(synth.data, "Liver_AD", "valid", "good", "img")
    bad = os.path.join(synth.data, "Liver_AD", "valid", "Ungood", "img")
    sup = load_support(synth.data, "Liver", img_size=SMALL, shot=3, iterate=-1, seed=5, sort_listing=True)
    rng = random.Random(5)
    assert sup.normal_files == rng.sample(sorted(os.listdir(good)), 3)
    assert sup.abnormal_files == rng.sample(sorted(os.listdir(bad)), 3)
    assert sup.abnormal_masks.shape == (3, 1, SMALL, SMALL)
    # no seed: the global random on the unsorted listing, as the reference
    # (its draw follows the file system's order)
    random.seed(11)
    sup = load_support(synth.data, "Liver", img_size=SMALL, shot=3, iterate=-1)
    random.seed(11)
    assert sup.normal_files == random.sample(os.listdir(good), 3)
    assert sup.abnormal_files == random.sample(os.listdir(bad), 3)
    with pytest.raises(
        ValueError, match=r"valid/good/img holds 6 images, fewer than a 7-shot support set needs"
    ):
        load_support(synth.data, "Liver", img_size=SMALL, shot=7, iterate=-1, seed=0)


# ---------------------------------------------------------------- pairing, bad input


def test_mask_pairing_by_name_and_hidden_files(brain):
    root = Path(brain.data) / "Brain_AD" / "test"
    before = MedTestDataset(brain.data, "Brain", img_size=32).items
    for d in (root / "good" / "img", root / "Ungood" / "img", root / "Ungood" / "anomaly_mask"):
        (d / ".DS_Store").write_bytes(b"\0\1junk")
        (d / "._00000.png").write_bytes(b"\0\1junk")
        (d / "notes.txt").write_text("not an image")
    assert MedTestDataset(brain.data, "Brain", img_size=32).items == before
    extra = root / "Ungood" / "anomaly_mask" / "00099.png"
    shutil.copy(root / "Ungood" / "anomaly_mask" / "00000.png", extra)
    with pytest.raises(ValueError, match=r"mask .*anomaly_mask/00099.png has no image of the same name"):
        MedTestDataset(brain.data, "Brain")
    extra.unlink()
    (root / "Ungood" / "anomaly_mask" / "00001.png").unlink()
    with pytest.raises(
        ValueError, match=r"no mask for image .*Ungood/img/00001.png: expected .*anomaly_mask/00001"
    ):
        MedTestDataset(brain.data, "Brain")


def test_support_mask_missing(brain):
    name = read_support_list("Brain", 2, 0, brain.seed_root)[1][0]
    (Path(brain.data) / "Brain_AD" / "valid" / "Ungood" / "anomaly_mask" / name).unlink()
    with pytest.raises(ValueError, match=f"no mask for image .*valid/Ungood/img/{name}"):
        MedDataset(brain.data, "Brain", img_size=32, shot=2, seed_root=brain.seed_root)


def test_corrupt_images_name_the_file(brain):
    good = Path(brain.data) / "Brain_AD" / "test" / "good" / "img"
    (good / "00000.png").write_bytes(b"definitely not a png")
    (good / "00001.png").write_bytes((good / "00002.png").read_bytes()[:80])  # truncated
    ds = MedTestDataset(brain.data, "Brain", img_size=32)
    for i in (0, 1):
        with pytest.raises(ValueError, match=f"cannot read image .*good/img/0000{i}.png"):
            ds[i]
    assert ds[2][0].shape == (3, 32, 32)


def test_unknown_obj_and_missing_folders(tmp_path, brain):
    for make in (
        lambda: MedTestDataset(brain.data, "Lung"),
        lambda: MedTrainDataset(brain.data, "Lung"),
        lambda: make_synthetic_bmad(str(tmp_path), objs=("Lung",)),
    ):
        with pytest.raises(
            ValueError, match="unknown dataset 'Lung': choose one of Brain, Liver, Retina_RESC"
        ):
            make()
    with pytest.raises(
        FileNotFoundError, match=r"nodata/Liver_AD; the BMAD data must be placed as data/Liver_AD/"
    ):
        MedTestDataset(str(tmp_path / "nodata"), "Liver")
    shutil.rmtree(Path(brain.data) / "Brain_AD" / "test" / "good" / "img")
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*Brain_AD/test/good/img"):
        MedTestDataset(brain.data, "Brain")
    with pytest.raises(FileNotFoundError, match=r"Liver_AD"):  # zero-shot training needs the five others
        MedTrainDataset(brain.data, "Brain")


def test_list_images_order(tmp_path):
    for n in ("b.png", "a.JPEG", ".hidden.png", "c.txt", "d.jpg"):
        (tmp_path / n).write_bytes(b"")
    assert _names(list_images(str(tmp_path))) == ["a.JPEG", "b.png", "d.jpg"]
    assert sorted(_names(list_images(str(tmp_path), sort=False))) == ["a.JPEG", "b.png", "d.jpg"]


# ---------------------------------------------------------------- zero-shot training set


def _reference_groups(data, obj, bs):
    """The zero-shot training groups the reference's way: listdir + shuffle per class, chunk, shuffle all;
    masks by 'img' replacement."""
    per_class = []
    for name in CLASS_NAMES:
        if name != obj:
            items = []
            for state, label in (("good", 0), ("Ungood", 1)):
                d = os.path.join(data, DATASETS[name].folder, "test", state, "img")
                items += [(os.path.join(d, f), label) for f in os.listdir(d)]
            random.shuffle(items)
            per_class.append((name, items))
    groups = []
    for name, items in per_class:
        for s in range(0, len(items), bs):
            chunk = items[s : s + bs]
            gts = tuple(data + p[len(data) :].replace("img", "anomaly_mask") if y else None for p, y in chunk)
            groups.append(
                (
                    tuple(p for p, _ in chunk),
                    tuple(y for _, y in chunk),
                    gts if DATASETS[name].has_masks else None,
                    name,
                )
            )
    random.shuffle(groups)
    return groups


def test_zero_shot_train_matches_reference_rule(reference_assets):
    data = str(reference_assets / "data")
    random.seed(111)
    first, second = _reference_groups(data, "Liver", 5), _reference_groups(data, "Liver", 5)
    after = random.random()
    random.seed(111)
    ds = MedTrainDataset(data, "Liver", img_size=32, batch_size=5)
    assert ds.data == first
    ds.shuffle_dataset()  # the next epoch: fresh listing and shuffles from the continuing global random
    assert ds.data == second
    assert random.random() == after  # same number of draws from the global random
    assert len(ds) == 5 * 3  # 12 test images per dataset -> groups of 5, 5, 2
    assert all("Liver_AD" not in p and f"{os.sep}test{os.sep}" in p for g in ds.data for p in g[0])


def test_zero_shot_train_items_and_determinism(synth):
    random.seed(3)
    ds = MedTrainDataset(synth.data, "Retina_RESC", img_size=SMALL, batch_size=4)
    random.seed(3)
    assert MedTrainDataset(synth.data, "Retina_RESC", img_size=SMALL, batch_size=4).data == ds.data
    every = sorted(p for g in ds.data for p in g[0])
    want = sorted(
        p
        for n in CLASS_NAMES
        if n != "Retina_RESC"
        for s in ("good", "Ungood")
        for p in list_images(os.path.join(synth.data, DATASETS[n].folder, "test", s, "img"))
    )
    assert every == want and len(ds) == 15
    for paths, labels, masks, name in ds.data:
        assert all(f"{DATASETS[name].folder}{os.sep}test{os.sep}" in p for p in paths)
        assert list(labels) == [int("Ungood" in p) for p in paths]
        if DATASETS[name].has_masks:
            assert [m and os.path.basename(m) for m in masks] == [
                os.path.basename(p) if y else None for p, y in zip(paths, labels)
            ]
        else:
            assert masks is None
    seg = next(i for i, g in enumerate(ds.data) if g[3] == "Brain" and 1 in g[1])
    imgs, y, m, name = ds[seg]
    assert imgs.shape == (4, 3, SMALL, SMALL) and y.dtype == torch.float32 and name == "Brain"
    assert m.shape == (4, 1, SMALL, SMALL) and [bool(v.sum() > 0) for v in m] == [bool(v) for v in y]
    det = next(i for i, g in enumerate(ds.data) if g[3] == "Chest")
    assert torch.equal(ds[det][2], torch.zeros(1, SMALL, SMALL))
    ds.shuffle_dataset()
    assert sorted(p for g in ds.data for p in g[0]) == every


def test_zero_shot_hidden_files_do_not_change_groups(tmp_path):
    paths = make_synthetic_bmad(str(tmp_path), n_per_split=2, seed=2, img_size=16, shots=())
    random.seed(0)
    before = MedTrainDataset(paths.data, "Chest", img_size=16, batch_size=3).data
    for n in CLASS_NAMES:
        (Path(paths.data) / DATASETS[n].folder / "test" / "good" / "img" / ".DS_Store").write_bytes(b"x")
    random.seed(0)
    assert MedTrainDataset(paths.data, "Chest", img_size=16, batch_size=3).data == before


# ---------------------------------------------------------------- synthetic generator


def test_synth_layout(synth):
    for obj, (folder, has_masks, _) in DATASETS.items():
        ext = ".jpeg" if obj == "Retina_OCT2017" else ".png"
        for split in ("valid", "test"):
            for state in ("good", "Ungood"):
                base = Path(synth.data) / folder / split / state
                assert sorted(os.listdir(base / "img")) == [f"{i:05d}{ext}" for i in range(6)]
                assert (base / "anomaly_mask").is_dir() == (has_masks and state == "Ungood")
                if (base / "anomaly_mask").is_dir():
                    assert sorted(os.listdir(base / "anomaly_mask")) == sorted(os.listdir(base / "img"))
                    for n in os.listdir(base / "anomaly_mask"):
                        m = np.asarray(Image.open(base / "anomaly_mask" / n))
                        assert set(np.unique(m)) == {0, 255} and (m > 0).mean() < 0.2
        img = Image.open(Path(synth.data) / folder / "test" / "good" / "img" / f"00000{ext}")
        assert img.size == (SMALL, SMALL) and img.mode == ("RGB" if obj == "Histopathology" else "L")
        lists = Path(synth.seed_root) / obj
        assert sorted(os.listdir(lists)) == ["2-shot.txt", "4-shot.txt"]  # no 8-shot list with 6 images
        text = (lists / "4-shot.txt").read_text()
        assert not text.endswith("\n") and [ln.split()[0] for ln in text.split("\n")] == [
            "n-0:",
            "a-0:",
            "n-1:",
            "a-1:",
            "n-2:",
            "a-2:",
        ]
        for line in text.split("\n"):
            names = line.split()[1:]
            assert len(set(names)) == 4 and all(n.endswith(ext) for n in names)


def test_synth_determinism(tmp_path, synth):
    def digest(root):
        return {
            str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*"))
            if p.is_file()
        }

    a = make_synthetic_bmad(
        str(tmp_path / "a"), n_per_split=3, seed=0, img_size=SMALL, objs=("Liver", "Chest"), shots=(2,)
    )
    make_synthetic_bmad(
        str(tmp_path / "b"), n_per_split=3, seed=0, img_size=SMALL, objs=("Liver", "Chest"), shots=(2,)
    )
    make_synthetic_bmad(
        str(tmp_path / "c"), n_per_split=3, seed=1, img_size=SMALL, objs=("Liver", "Chest"), shots=(2,)
    )
    da, db, dc = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert da == db and len(da) == 2 * 4 * 3 + 2 * 3 + 2  # images, Liver masks, lists
    assert sum(da[k] != dc[k] for k in da) >= 20
    full = Path(synth.data) / "Liver_AD" / "test" / "Ungood" / "img" / "00002.png"
    assert (
        Path(a.data) / "Liver_AD" / "test" / "Ungood" / "img" / "00002.png"
    ).read_bytes() == full.read_bytes()


def test_synth_readable_by_datasets(synth):
    for obj in CLASS_NAMES:
        ds = MedDataset(synth.data, obj, img_size=32, shot=4, iterate=2, seed_root=synth.seed_root)
        assert len(ds) == 12 and ds.support.normal.shape == (4, 3, 32, 32)
        img, y, mask = ds[11]
        assert y == 1 and img.shape == (3, 32, 32)
        assert (mask.sum() > 0) == DATASETS[obj].has_masks
        assert (ds.support.abnormal_masks is not None) == DATASETS[obj].has_masks
