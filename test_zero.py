"""Zero-shot test: the adapters trained on the other five datasets, compared with text prompts only (spec 7.5).

    python test_zero.py --obj Liver
    python test_zero.py --obj Histopathology --precision bf16 --batch_size 8
"""
import argparse

import torch
from torch.utils.data import DataLoader

from dataset import DATASETS, check_obj
from dataset.medical_zero import MedTestDataset
from evaluate import collect, evaluate, result_lines
from predict import save_test_maps
from prompt import text_features_for
from utils import add_common_args, build_model, checkpoint_path, clip_file, resolve_device, run_main, setup_seed, \
    write_record
from visualize import add_map_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, obj="Retina_RESC")
    p.add_argument("--save_path", default="./ckpt/zero-shot/", help="folder of the adapter checkpoints {obj}.pth")
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    add_map_args(p)  # --save_maps DIR, --grid_n
    return p


def load_test_data(args) -> MedTestDataset:
    check_obj(args.obj)
    return MedTestDataset(args.data_path, args.obj, args.img_size, normalize=args.clip_normalize)


def evaluate_zeroshot(args, model, dataset: MedTestDataset, text: torch.Tensor, device: torch.device,
                      pixel_extras: bool = True, maps_dir: str | None = None) -> dict:
    """One scored pass over `dataset`; with `maps_dir`, the anomaly maps are drawn there (predict.save_test_maps)."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    collected = collect(model, loader, text, device, DATASETS[args.obj][1], None, args.precision, args.img_size)
    result = evaluate(collected, False, device, args.precision, pixel_extras)
    if maps_dir:
        save_test_maps(maps_dir, dataset, collected, result["image_scores"], model, text, device, args)
    return result


def run(args, model=None) -> dict:
    """`model`: a prebuilt `build_model(args, device)` to reuse (its adapters get replaced); None builds one."""
    device = resolve_device(args.device)
    setup_seed(args.seed)
    dataset = load_test_data(args)
    ckpt = args.ckpt or checkpoint_path(args.save_path, args.obj)
    model = build_model(args, device) if model is None else model
    model.load_adapters(ckpt)
    text = text_features_for(model.clipmodel, [args.obj], device, args.precision)[args.obj]  # this dataset's only
    result = evaluate_zeroshot(args, model, dataset, text, device, maps_dir=args.save_maps)
    print("\n".join(result_lines(args.obj, result, fewshot=False)))
    write_record(args.out_dir, "test_zero", args, result, {"clip": clip_file(args), "adapters": ckpt},
                 device)
    return result


def main(argv=None) -> int:
    return run_main(run, parser(), argv)


if __name__ == "__main__":
    main()
