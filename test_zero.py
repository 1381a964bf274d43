"""Zero-shot test: the adapters trained on the other five datasets, compared with text prompts only.

python test_zero.py --obj Liver
python test_zero.py --obj Histopathology --precision bf16 --batch_size 8
"""

import argparse

from mvfa.config import configs
from mvfa.evaluation import evaluate_set, result_lines, save_scores
from mvfa.flags import add_map_args, new_parser, one_line_errors
from mvfa.maps import save_test_maps
from mvfa.protocol import prompt, test_set
from mvfa.records import write_record
from mvfa.seeding import setup_seed
from mvfa.text_cache import text_cache
from prompt import text_features_for


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__, obj="Retina_RESC")
    p.add_argument(
        "--save_path", default="./ckpt/zero-shot/", help="folder of the adapter checkpoints {obj}.pth"
    )
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    add_map_args(p)  # --save_maps DIR, --grid_n, --save_scores
    return p


def main(argv=None) -> dict:
    flags = vars(parser().parse_args(argv))
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="zero")
        setup_seed(run.seed)
        dataset = test_set(run)
        model = model_cfg.build(device, precision)
        store = text_cache(model_cfg, precision, device, run.text_cache_dir)
        model.load_adapters(run.checkpoint)
        text = text_features_for(model.clipmodel, [prompt(run)], device, precision, store)[prompt(run)]
        result, collected = evaluate_set(model, dataset, text, run, precision)
        if run.save_scores:
            files = [path for path, _, _ in dataset.items]
            save_scores(run.save_scores, collected, result, files, device, precision)
        if run.save_maps:
            save_test_maps(
                run.save_maps, dataset, collected, result["image_scores"], device, precision, run.grid_n
            )
        print("\n".join(result_lines(run.obj, result, fewshot=False)))
        files = {"clip": model_cfg.clip_file, "adapters": run.checkpoint}
        write_record(run.out_dir, "test_zero", run.name, flags, result, files, device)
    return result


if __name__ == "__main__":
    main()
