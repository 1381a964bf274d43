"""Few-shot MVFA (spec 6): the flags, data and evaluation of test_few.py (text comparison fused with a memory bank
of the augmented normal support images) and the training of train_few.py (the target's k normal and k abnormal
support images, 11 augmentations each)."""
import argparse
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from CLIP import build_model
from cli import add_fewshot_args, add_map_args, add_training_args, new_parser
from dataset import check_target, dataset_root, prompt_of
from dataset.medical_few import MedDataset, MedTestDataset
from evaluate import build_memory, collect, evaluate, result_lines, save_scores
from prompt import text_features_for
from records import checkpoint_path, clip_file, write_record
from training import Training, preflight, train_step
from utils import augment, draw_as_loader, resolve_device, setup_seed
from visualize import save_test_maps


def test_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = new_parser(description, obj="Liver")
    add_fewshot_args(p, several=True)
    p.add_argument("--save_path", default="./ckpt/few-shot/", help="folder of the adapter checkpoints {obj}.pth")
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    p.add_argument("--shot_in_name", action="store_true", help="read {obj}_{shot}shot.pth instead of {obj}.pth")
    add_map_args(p)  # --save_maps DIR (one subfolder iterate_{i} per draw when several), --grid_n
    return p


def train_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = new_parser(description, obj="Liver")
    add_fewshot_args(p)
    add_training_args(p, lr=0.001, save_path="./ckpt/few-shot/")
    p.add_argument("--shot_in_name", action="store_true",
                   help="fix: save as {obj}_{shot}shot.pth so runs with other k do not replace each other")
    return p


def load_fewshot_data(args, iterate: int) -> MedDataset:
    check_target(args.data_path, args.obj, args.prompt_name)
    # iterate < 0 draws with the global `random` seeded by setup_seed(--seed), as the reference; successive draws
    # of one run therefore differ
    return MedDataset(args.data_path, args.obj, args.img_size, args.shot, iterate, seed=None,
                      seed_root=args.seed_dir, sort_listing=args.sort_listing, normalize=args.clip_normalize)


def evaluate_fewshot(args, model, dataset, support: torch.Tensor, text: torch.Tensor, device: torch.device,
                     pixel_extras: bool = True, maps_dir: str | None = None, scores_file: str | None = None) -> dict:
    """Memory bank of `support` [11k, 3, H, W], then one scored pass over `dataset` (maps drawn in `maps_dir`,
    scores saved to `scores_file`)."""
    draw_as_loader(shuffle=True)  # the reference reads the support images through a shuffling loader
    memory = build_memory(model, support, device, args.precision, args.batch_size, keep_cls=not args.memory_no_cls)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    collected = collect(model, loader, text, device, has_masks=dataset.has_masks, memory=memory,
                        precision=args.precision, img_size=args.img_size)
    result = evaluate(collected, fewshot=True, device=device, precision=args.precision, pixel_extras=pixel_extras)
    if scores_file:
        files = [path for path, _, _ in dataset.items]
        save_scores(scores_file, collected, result, files, fewshot=True, device=device, precision=args.precision)
    if maps_dir:
        save_test_maps(maps_dir, dataset, collected, result["image_scores"], model, text, device, args, memory)
    return result


def test(args, model=None) -> dict:
    """test_few.py. `model`: a prebuilt `build_model(args, device)` to reuse (its adapters get replaced)."""
    device = resolve_device(args.device)
    setup_seed(args.seed)
    draws = [load_fewshot_data(args, it) for it in args.iterate]  # all support sets checked before the model loads
    ckpt = args.ckpt or checkpoint_path(args.save_path, args.obj, args.shot if args.shot_in_name else None)
    model = build_model(args, device) if model is None else model
    model.load_adapters(ckpt)
    prompt = prompt_of(args.obj, args.prompt_name)
    text = text_features_for(model.clipmodel, [prompt], device, args.precision)[prompt]
    results = []
    for i, (iterate, dataset) in enumerate(zip(args.iterate, draws)):
        support, _ = augment(dataset.support.normal)  # [11k, 3, H, W]
        # one folder per draw, by index (--iterate -1 -1 repeats a value)
        maps_dir = args.save_maps and (f"{args.save_maps}/iterate_{i}" if len(draws) > 1 else args.save_maps)
        scores = args.save_scores and (
            f"{args.save_scores.removesuffix('.npz')}_iterate_{i}.npz" if len(draws) > 1 else args.save_scores
        )
        results.append(
            evaluate_fewshot(args, model, dataset, support, text, device, maps_dir=maps_dir, scores_file=scores)
        )
        if len(draws) > 1:
            print(f"support draw {i} (--iterate {iterate}): " + " ".join(dataset.support.normal_files))
        print("\n".join(result_lines(args.obj, results[-1], fewshot=True)))
    record = results[0]
    if len(results) > 1:  # the mean and standard deviation of every metric over the draws
        values = {k: [r[k] for r in results] for k, v in results[0].items() if isinstance(v, float)}
        summary = {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()}
        record = {"draws": [{"iterate": it, **r} for it, r in zip(args.iterate, results)], "summary": summary}
        for key, value in summary.items():
            print(f"{args.obj} {key} : {value['mean']:.4f} ± {value['std']:.4f} over {len(results)} draws")
    write_record(args.out_dir, "test_few", args, record, {"clip": clip_file(args), "adapters": ckpt}, device)
    return record


def selection_set(args, data):
    """What checkpoints are chosen on: the test set (reference), or the valid split minus the support images."""
    if args.select != "val":
        return data
    held_out = MedTestDataset(args.data_path, args.obj, args.img_size, args.clip_normalize, "valid")
    valid = os.path.join(dataset_root(args.data_path, args.obj), "valid")
    used = {os.path.join(valid, "good", "img", n) for n in data.support.normal_files} | \
           {os.path.join(valid, "Ungood", "img", n) for n in data.support.abnormal_files}
    # by path, not by name: a normal and an abnormal image may have the same file name
    held_out.items = [item for item in held_out.items if item[0] not in used]
    if len({label for _, label, _ in held_out.items}) < 2:
        raise ValueError(f"--select val: the valid split of {args.obj} has no normal or no abnormal image left "
                         f"besides the support set; use --select test or last")
    return held_out


def train(args) -> dict:
    """train_few.py: the adapters trained on the augmented support set, selected as --select says."""
    device = resolve_device(args.device)
    target = checkpoint_path(args.save_path, args.obj, args.shot if args.shot_in_name else None)
    saved = preflight(args, device, target)  # folders, checkpoint, weights, --resume's state: before the data
    setup_seed(args.seed, args.deterministic)
    data = load_fewshot_data(args, args.iterate)
    selection_data = selection_set(args, data)  # all the data checked before the model is built
    run = Training(args, device, target, fewshot=True, saved=saved)
    # the training set: augmented abnormal (label 1, their masks) then augmented normal (label 0, empty masks)
    abnormal, abnormal_masks = augment(data.support.abnormal, data.support.abnormal_masks)
    support, normal_masks = augment(data.support.normal)  # [11k, 3, H, W], also the memory-bank images
    labels = torch.tensor([1.0] * len(abnormal) + [0.0] * len(support))  # 22k items
    items = TensorDataset(torch.cat([abnormal, support]), torch.cat([abnormal_masks, normal_masks]), labels)
    loader = DataLoader(items, batch_size=1, shuffle=True)
    prompt = prompt_of(args.obj, args.prompt_name)
    text = text_features_for(run.model.clipmodel, [prompt], device, args.precision)[prompt]

    def step(images, masks, labels):
        return train_step(run.model, images, labels, masks, text, has_masks=data.has_masks, **run.options)

    run.fit(lambda epoch: loader, step,
            lambda: evaluate_fewshot(args, run.model, selection_data, support, text, device, pixel_extras=False))
    return run.finish("train_few", lambda: evaluate_fewshot(args, run.model, data, support, text, device))
