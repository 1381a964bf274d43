"""Zero-shot training: adapters trained on the other five datasets' test splits, leave-one-out (spec 7.1, 7.4).

    python train_zero.py --obj Retina_RESC
    python train_zero.py --obj Brain --select val --save_path ./ckpt/mine-zero/
"""
from cli import script
from zeroshot import train as run, train_parser

parser, main = script(run, train_parser, __doc__)

if __name__ == "__main__":
    main()
