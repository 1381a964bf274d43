"""Few-shot test: text comparison fused with a memory bank of augmented support images (spec 6.5-6.7).

    python test_few.py --obj Brain --shot 4
    python test_few.py --obj Chest --shot 4 --iterate 0 --precision bf16 --batch_size 8
    python test_few.py --obj Liver --shot 4 --iterate 0 1 2    # three support lists: mean ± std
"""
import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset import DATASETS, check_obj
from dataset.medical_few import MedDataset
from evaluate import build_memory, collect, evaluate, result_lines
from predict import save_test_maps
from prompt import text_features_for
from utils import (add_common_args, add_fewshot_args, augment, build_model, checkpoint_path, clip_file, draw_as_loader,
                   resolve_device, run_main, setup_seed, write_record)
from visualize import add_map_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, obj="Liver")
    add_fewshot_args(p, several=True)
    p.add_argument("--save_path", default="./ckpt/few-shot/", help="folder of the adapter checkpoints {obj}.pth")
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    p.add_argument("--shot_in_name", action="store_true", help="read {obj}_{shot}shot.pth instead of {obj}.pth")
    add_map_args(p)  # --save_maps DIR (one subfolder iterate_{i} per draw when several), --grid_n
    return p


def load_fewshot_data(args, iterate: int) -> MedDataset:
    check_obj(args.obj)
    # iterate < 0 draws with the global `random` seeded by setup_seed(--seed), as the reference; successive draws
    # of one run therefore differ
    return MedDataset(args.data_path, args.obj, args.img_size, args.shot, iterate, seed=None,
                      seed_root=args.seed_dir, sort_listing=args.sort_listing, normalize=args.clip_normalize)


def summarize(results: list[dict]) -> dict:
    """Mean and standard deviation of every metric over several support draws."""
    keys = [k for k, v in results[0].items() if isinstance(v, float)]
    return {k: {"mean": float(np.mean([r[k] for r in results])), "std": float(np.std([r[k] for r in results]))}
            for k in keys}


def evaluate_fewshot(args, model, dataset, support: torch.Tensor, text: torch.Tensor, device: torch.device,
                     pixel_extras: bool = True, maps_dir: str | None = None) -> dict:
    """Memory bank from the augmented normal support images [11k, 3, H, W], then one scored pass over `dataset`;
    with `maps_dir`, the anomaly maps are drawn there (predict.save_test_maps)."""
    draw_as_loader(shuffle=True)  # the reference reads the support images through a shuffling loader
    memory = build_memory(model, support, device, args.precision, args.batch_size, keep_cls=not args.memory_no_cls)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    has_masks = DATASETS[args.obj][1]
    collected = collect(model, loader, text, device, has_masks, memory, args.precision, args.img_size)
    result = evaluate(collected, True, device, args.precision, pixel_extras)
    if maps_dir:
        save_test_maps(maps_dir, dataset, collected, result["image_scores"], model, text, device, args, memory)
    return result


def run(args, model=None) -> dict:
    """`model`: a prebuilt `build_model(args, device)` to reuse (its adapters get replaced); None builds one."""
    device = resolve_device(args.device)
    setup_seed(args.seed)
    draws = [load_fewshot_data(args, it) for it in args.iterate]  # all support sets checked before the model loads
    ckpt = args.ckpt or checkpoint_path(args.save_path, args.obj, args.shot if args.shot_in_name else None)
    model = build_model(args, device) if model is None else model
    model.load_adapters(ckpt)
    text = text_features_for(model.clipmodel, [args.obj], device, args.precision)[args.obj]
    results = []
    for i, (iterate, dataset) in enumerate(zip(args.iterate, draws)):
        support, _ = augment(dataset.support.normal)  # [11k, 3, H, W]
        # one folder per draw, by index (--iterate -1 -1 repeats a value)
        maps_dir = args.save_maps and (f"{args.save_maps}/iterate_{i}" if len(draws) > 1 else args.save_maps)
        results.append(evaluate_fewshot(args, model, dataset, support, text, device, maps_dir=maps_dir))
        if len(draws) > 1:
            print(f"support draw {i} (--iterate {iterate}): " + " ".join(dataset.support.normal_files))
        print("\n".join(result_lines(args.obj, results[-1], fewshot=True)))
    record = results[0]
    if len(results) > 1:
        record = {"draws": [{"iterate": it, **r} for it, r in zip(args.iterate, results)],
                  "summary": summarize(results)}
        for key, value in record["summary"].items():
            print(f"{args.obj} {key} : {value['mean']:.4f} ± {value['std']:.4f} over {len(results)} draws")
    write_record(args.out_dir, "test_few", args, record, {"clip": clip_file(args), "adapters": ckpt},
                 device)
    return record


def main(argv=None) -> int:
    return run_main(run, parser(), argv)


if __name__ == "__main__":
    main()
