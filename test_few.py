"""Few-shot test: the adapters' text comparison fused with a memory bank of the k augmented normal support
images; MVFA's (few-shot adapters trained on k normal + k abnormal images) or, --support normal, the k normal
images alone with the zero-shot adapters.

    python test_few.py --obj Brain --shot 4 --iterate 0
    python test_few.py --obj Liver --shot 4 --iterate 0 1 2 --save_maps maps/liver
    python test_few.py --obj Chest --shot 4 --precision bf16 --batch_size 8
    python test_few.py --obj Brain --support normal --shot 4 --iterate -1 -1 -1 --seed 1 --normalize support
"""

import argparse

from mvfa.config import configs
from mvfa.flags import (
    add_fewshot_args,
    add_map_args,
    add_normalize_args,
    add_support_arg,
    new_parser,
    one_line_errors,
)
from mvfa.protocol import calibration_set, prompt, test_set
from mvfa.seeding import setup_seed
from mvfa.testing import test_adapters
from mvfa.text_cache import adapted_model

# where each protocol's adapters are: MVFA's few-shot ones, or the zero-shot ones (trained on the other five
# datasets, never on the target)
ADAPTER_FOLDERS = {"mvfa": "./ckpt/few-shot/", "normal": "./ckpt/zero-shot/"}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__, obj="Liver")
    add_fewshot_args(p, several=True)
    add_support_arg(p)
    p.add_argument(
        "--save_path",
        default=None,
        help="folder of the adapter checkpoints {obj}.pth (default ./ckpt/few-shot/; --support normal: "
        "./ckpt/zero-shot/)",
    )
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    p.add_argument(
        "--shot_in_name", action="store_true", help="read {obj}_{shot}shot.pth instead of {obj}.pth"
    )
    add_normalize_args(p, fewshot=True)
    # --save_maps DIR (one subfolder iterate_{i} per draw when several), --grid_n, --save_scores
    add_map_args(p)
    return p


def parsed(argv=None) -> dict:
    """The flags, with --save_path defaulting to the folder of the protocol's adapters."""
    flags = vars(parser().parse_args(argv))
    flags["save_path"] = flags["save_path"] or ADAPTER_FOLDERS[flags["support"]]
    return flags


def main(argv=None) -> dict:
    flags = parsed(argv)
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="few")
        setup_seed(run.seed)
        draws = [test_set(run, iterate) for iterate in run.iterate]  # every support set read before the model
        calibration = calibration_set(run)  # --normalize support: normal images to fit on, or None
        model, texts = adapted_model(model_cfg, precision, device, [prompt(run)], run.text_cache_dir)
        text = texts[prompt(run)]
        return test_adapters(model, run, precision, text, draws, model_cfg.clip_file, calibration)


if __name__ == "__main__":
    main()
