"""Zero-shot MVFA: the flags, data and evaluation of test_zero.py and the leave-one-dataset-out training of
train_zero.py (spec 7): adapters trained on the other five datasets' test splits, compared with text prompts only."""
import argparse

import torch
from torch.utils.data import DataLoader

from CLIP import build_model
from cli import add_map_args, add_sort_listing_arg, add_training_args, new_parser
from dataset import CLASS_NAMES, DATASETS, check_target, prompt_of
from dataset.medical_zero import MedTestDataset, MedTrainDataset
from evaluate import collect, evaluate, result_lines, save_scores
from prompt import text_features_for
from records import checkpoint_path, clip_file, write_record
from training import Training, preflight, train_step
from utils import resolve_device, setup_seed
from visualize import save_test_maps


def test_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = new_parser(description, obj="Retina_RESC")
    p.add_argument("--save_path", default="./ckpt/zero-shot/", help="folder of the adapter checkpoints {obj}.pth")
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    add_map_args(p)  # --save_maps DIR, --grid_n
    return p


def train_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = new_parser(description, obj="Retina_RESC")
    add_training_args(p, lr=0.0001, save_path="./ckpt/zero-shot/")
    add_sort_listing_arg(p, "the training images are shuffled into groups")
    return p


def load_test_data(args) -> MedTestDataset:
    check_target(args.data_path, args.obj, args.prompt_name)
    return MedTestDataset(args.data_path, args.obj, args.img_size, normalize=args.clip_normalize)


def evaluate_zeroshot(args, model, dataset: MedTestDataset, text: torch.Tensor, device: torch.device,
                      pixel_extras: bool = True, maps_dir: str | None = None, scores_file: str | None = None) -> dict:
    """One scored pass over `dataset`; with `maps_dir`, the anomaly maps are drawn there; with `scores_file`, the
    scores are saved there."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    collected = collect(model, loader, text, device, has_masks=dataset.has_masks,
                        precision=args.precision, img_size=args.img_size)
    result = evaluate(collected, fewshot=False, device=device, precision=args.precision, pixel_extras=pixel_extras)
    if scores_file:
        files = [path for path, _, _ in dataset.items]
        save_scores(scores_file, collected, result, files, fewshot=False, device=device, precision=args.precision)
    if maps_dir:
        save_test_maps(maps_dir, dataset, collected, result["image_scores"], model, text, device, args)
    return result


def test(args, model=None) -> dict:
    """test_zero.py. `model`: a prebuilt `build_model(args, device)` to reuse (its adapters get replaced)."""
    device = resolve_device(args.device)
    setup_seed(args.seed)
    dataset = load_test_data(args)
    ckpt = args.ckpt or checkpoint_path(args.save_path, args.obj)
    model = build_model(args, device) if model is None else model
    model.load_adapters(ckpt)
    prompt = prompt_of(args.obj, args.prompt_name)
    text = text_features_for(model.clipmodel, [prompt], device, args.precision)[prompt]  # this dataset's only
    result = evaluate_zeroshot(args, model, dataset, text, device, maps_dir=args.save_maps,
                               scores_file=args.save_scores)
    print("\n".join(result_lines(args.obj, result, fewshot=False)))
    write_record(args.out_dir, "test_zero", args, result, {"clip": clip_file(args), "adapters": ckpt}, device)
    return result


def train(args) -> dict:
    """train_zero.py: the adapters trained on the other five datasets, selected 5-6 times per epoch (spec 7.4)."""
    device = resolve_device(args.device)
    target = checkpoint_path(args.save_path, args.obj)
    saved = preflight(args, device, target)  # folders, checkpoint, weights, --resume's state: before the data
    setup_seed(args.seed, args.deterministic)
    check_target(args.data_path, args.obj, args.prompt_name)
    train_set = MedTrainDataset(args.data_path, args.obj, args.img_size, args.batch_size,
                                sort_listing=args.sort_listing, normalize=args.clip_normalize)
    if len(train_set) == 0:
        raise ValueError(f"no zero-shot training images: the test splits of the other datasets under "
                         f"{args.data_path} are empty (training uses the BMAD datasets other than --obj {args.obj})")
    test_set = load_test_data(args)
    # deviation (--select val): the target's valid split, never its test split
    selection_data = test_set if args.select != "val" else MedTestDataset(args.data_path, args.obj, args.img_size,
                                                                          args.clip_normalize, "valid")
    run = Training(args, device, target, fewshot=False, saved=saved)
    prompt = prompt_of(args.obj, args.prompt_name)
    texts = text_features_for(run.model.clipmodel, [*CLASS_NAMES, prompt], device, args.precision)

    def batches(epoch: int) -> DataLoader:
        if epoch > 0:  # the reference regroups after every epoch (fresh listing, fresh shuffles)
            train_set.shuffle_dataset()
        return DataLoader(train_set, batch_size=1, shuffle=True, num_workers=args.num_workers)

    def step(images, labels, masks, name):
        name = name[0]  # each loader item is one pre-grouped batch: [1, B, ...]
        return train_step(run.model, images[0], labels[0], masks[0], texts[name], has_masks=DATASETS[name].has_masks,
                          **run.options)

    every = max(1, len(train_set) // 5)  # deviation: the reference divides by zero below 5 groups (spec Q24)
    run.fit(batches, step, lambda: evaluate_zeroshot(args, run.model, selection_data, texts[prompt], device,
                                                     pixel_extras=False), every)
    return run.finish("train_zero", lambda: evaluate_zeroshot(args, run.model, test_set, texts[prompt], device))
