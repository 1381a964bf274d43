"""Few-shot test: the adapters' text comparison fused with a memory bank of the k augmented normal support
images.

    python test_few.py --obj Brain --shot 4 --iterate 0
    python test_few.py --obj Liver --shot 4 --iterate 0 1 2 --save_maps maps/liver
    python test_few.py --obj Chest --shot 4 --precision bf16 --batch_size 8
"""

import argparse

import numpy as np

from dataset.augment import augment
from mvfa.config import configs
from mvfa.evaluation import evaluate_set, result_lines, save_scores
from mvfa.flags import add_fewshot_args, add_map_args, new_parser, one_line_errors
from mvfa.maps import save_test_maps
from mvfa.protocol import prompt, test_set
from mvfa.records import write_record
from mvfa.seeding import setup_seed
from mvfa.text_cache import text_cache
from prompt import text_features_for


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__, obj="Liver")
    add_fewshot_args(p, several=True)
    p.add_argument(
        "--save_path", default="./ckpt/few-shot/", help="folder of the adapter checkpoints {obj}.pth"
    )
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    p.add_argument(
        "--shot_in_name", action="store_true", help="read {obj}_{shot}shot.pth instead of {obj}.pth"
    )
    # --save_maps DIR (one subfolder iterate_{i} per draw when several), --grid_n, --save_scores
    add_map_args(p)
    return p


def per_draw(path: str | None, i: int, draws: int, suffix: str = "") -> str | None:
    """An output path of draw i: as given for a single draw, else with `_iterate_{i}` (a folder:
    `/iterate_{i}`)."""
    if not path or draws == 1:
        return path
    return f"{path}/iterate_{i}" if not suffix else f"{path.removesuffix(suffix)}_iterate_{i}{suffix}"


def main(argv=None) -> dict:
    flags = vars(parser().parse_args(argv))
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="few")
        setup_seed(run.seed)
        draws = [test_set(run, iterate) for iterate in run.iterate]  # every support set read before the model
        model = model_cfg.build(device, precision)
        store = text_cache(model_cfg, precision, device, run.text_cache_dir)
        model.load_adapters(run.checkpoint)
        text = text_features_for(model.clipmodel, [prompt(run)], device, precision, store)[prompt(run)]
        results = []
        for i, (iterate, dataset) in enumerate(zip(run.iterate, draws)):
            memory_images, _ = augment(dataset.support.normal)  # [11k, 3, H, W]
            result, collected = evaluate_set(model, dataset, text, run, precision, memory_images)
            if scores_file := per_draw(run.save_scores, i, len(draws), ".npz"):
                files = [path for path, _, _ in dataset.items]
                save_scores(scores_file, collected, result, files, device, precision)
            if maps_dir := per_draw(run.save_maps, i, len(draws)):
                save_test_maps(
                    maps_dir, dataset, collected, result["image_scores"], device, precision, run.grid_n
                )
            if len(draws) > 1:
                print(f"support draw {i} (--iterate {iterate}): " + " ".join(dataset.support.normal_files))
            print("\n".join(result_lines(run.obj, result, fewshot=True)))
            results.append(result)
        record = results[0]
        if len(results) > 1:  # the mean and standard deviation of every metric over the draws
            values = {k: [r[k] for r in results] for k, v in results[0].items() if isinstance(v, float)}
            summary = {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()}
            record = {
                "draws": [{"iterate": it, **r} for it, r in zip(run.iterate, results)],
                "summary": summary,
            }
            for key, value in summary.items():
                print(f"{run.obj} {key} : {value['mean']:.4f} ± {value['std']:.4f} over {len(results)} draws")
        files = {"clip": model_cfg.clip_file, "adapters": run.checkpoint}
        write_record(run.out_dir, "test_few", run.name, flags, record, files, device)
    return record


if __name__ == "__main__":
    main()
