"""Zero-shot test: the adapters trained on the other five datasets, compared with text prompts only (spec 7.5).

    python test_zero.py --obj Liver
    python test_zero.py --obj Histopathology --precision bf16 --batch_size 8
"""
from cli import script
from zeroshot import test as run, test_parser

parser, main = script(run, test_parser, __doc__)

if __name__ == "__main__":
    main()
