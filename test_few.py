"""Few-shot test: the adapters' text comparison fused with a memory bank of the k augmented normal support
images.

    python test_few.py --obj Brain --shot 4 --iterate 0
    python test_few.py --obj Liver --shot 4 --iterate 0 1 2 --save_maps maps/liver
    python test_few.py --obj Chest --shot 4 --precision bf16 --batch_size 8
"""

import argparse

from mvfa.config import configs
from mvfa.flags import add_fewshot_args, add_map_args, new_parser, one_line_errors
from mvfa.protocol import prompt, test_set
from mvfa.seeding import setup_seed
from mvfa.testing import test_adapters
from mvfa.text_cache import adapted_model


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


def main(argv=None) -> dict:
    flags = vars(parser().parse_args(argv))
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="few")
        setup_seed(run.seed)
        draws = [test_set(run, iterate) for iterate in run.iterate]  # every support set read before the model
        model, texts = adapted_model(model_cfg, precision, device, [prompt(run)], run.text_cache_dir)
        return test_adapters(model, run, precision, texts[prompt(run)], draws, model_cfg.clip_file)


if __name__ == "__main__":
    main()
