"""Zero-shot test: the adapters trained on the other five datasets, compared with text prompts only.

python test_zero.py --obj Liver
python test_zero.py --obj Histopathology --precision bf16 --batch_size 8
python test_zero.py --obj Brain --normalize support --calibration data/Brain_AD/valid/good/img
"""

import argparse

from mvfa.config import configs
from mvfa.flags import add_map_args, add_normalize_args, new_parser, one_line_errors
from mvfa.protocol import calibration_set, prompt, test_set
from mvfa.seeding import setup_seed
from mvfa.testing import test_adapters
from mvfa.text_cache import adapted_model


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__, obj="Retina_RESC")
    p.add_argument(
        "--save_path", default="./ckpt/zero-shot/", help="folder of the adapter checkpoints {obj}.pth"
    )
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    add_normalize_args(p, fewshot=False)
    add_map_args(p)  # --save_maps DIR, --grid_n, --save_scores
    return p


def main(argv=None) -> dict:
    flags = vars(parser().parse_args(argv))
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="zero")
        setup_seed(run.seed)
        dataset = test_set(run)
        calibration = calibration_set(run)  # --normalize support: normal images to fit on, or None
        model, texts = adapted_model(model_cfg, precision, device, [prompt(run)], run.text_cache_dir)
        text = texts[prompt(run)]
        return test_adapters(model, run, precision, text, [dataset], model_cfg.clip_file, calibration)


if __name__ == "__main__":
    main()
