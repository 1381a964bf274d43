"""CLIP/tokenizer.py: the reference's ids, known ids of the prompt names, the prompts' lengths,
and open_clip as an oracle."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from CLIP.tokenizer import EOT_ID, SOT_ID, SimpleTokenizer, bytes_to_unicode, get_tokenizer, tokenize

# The reference's prompt states and sentences, verbatim.
NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
SENTENCES = [
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
]
# name -> longest prompt incl. SOT/EOT (all well under the 77-token context: no prompt is truncated)
PROMPT_LENGTHS = {
    "Brain": 16,
    "Liver": 16,
    "retinal OCT": 18,
    "Chest X-ray film": 20,
    "histopathological image": 21,
}


def max_length(texts: list[str]) -> int:
    """Longest tokenized length incl. SOT/EOT (0 for no texts)."""
    return max((len(get_tokenizer().encode(text)) + 2 for text in texts), default=0)


def prompts(name: str) -> list[str]:
    """The 420 ensemble sentences for one name: 245 normal then 175 abnormal
    (states outer, sentences inner)."""
    return [
        s.format(state.format(name))
        for group in (NORMAL_STATES, ABNORMAL_STATES)
        for state in group
        for s in SENTENCES
    ]


def varied_strings() -> list[str]:
    """Hand-picked awkward strings plus seeded random mixes
    of letters, digits, punctuation, unicode, whitespace."""
    hand = [
        "",
        " ",
        "\t\n  ",
        "a",
        "A",
        "!!!",
        "hello, world!",
        "Hello   World\n\tagain",
        "it's isn't we're I've I'm",
        "you'll he'd THEY'RE",
        "'s 't 're 've 'm 'll 'd",
        "rock'n'roll o'clock",
        "don’t (curly apostrophe)",
        "1234567890",
        "3.14159 and 2,718",
        "x-ray; ct/mri: t1-weighted (flair)",
        "e-mail@example.com #tag $5 100%",
        "Café naïve résumé façade",
        "ÅNGSTRÖM Straße",
        "日本語のテキスト",
        "中文 医学 图像",
        "한국어 문장",
        "Привет мир",
        "Ελληνικά",
        "مرحبا بالعالم",
        "emoji 😀🩺🧠 test",
        "👍🏽 👨‍👩‍👧",
        "cafÃ©",
        "doesnÃ¢â‚¬â„¢t",
        "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;",
        "fish &amp; chips",
        "&lt;tag&gt;",
        "&#39;quoted&#39; &quot;x&quot;",
        "&nbsp;non&nbsp;breaking",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "supercalifragilisticexpialidocious" * 3,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "ab" * 40,
        "\u00a0nbsp\u2003em-space\u3000ideographic",
        "zero\u200bwidth",
        "tab\there",
        "line\r\nbreak",
        "…—–‘’“”«»",
        "^_^ :-) <3 ->",
        "__init__.py",
        "C++ / C# / F#",
        "½ ¼ ² ³ ℃ ™ ©",
        "ﬁligature ﬂ",
        "Ⅻ roman",
        "١٢٣ arabic digits",
        "mixed123abc456",
        "the end.",
        "a photo of a cat.",
    ]
    rng = random.Random(0)
    pool = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        + "     \t\n"
        + ".,;:!?'\"-()[]/&#%"
        + "éèüöñçßøåÆ"
        + "日本中文한국"
        + "😀🧠🩺"
        + "'s't're"
    )
    randoms = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    longs = ["".join(rng.choice(pool) for _ in range(rng.randint(150, 400))) for _ in range(5)]  # > 77 tokens
    return hand + randoms + longs + ["a photo of the brain " * 20, "日本語" * 40]


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def oracle():
    """open_clip's tokenizer module.
    Loaded on its own: `import open_clip` pulls in timm etc. and costs ~6 s."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip (package open_clip_torch) is not installed: no independent tokenizer oracle")
    try:
        path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
        module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (ImportError, OSError):  # a layout that needs the package: import it whole
        module = pytest.importorskip("open_clip").tokenizer
    return module


def test_reference_ids(goldens):
    ids = tokenize(goldens["token_strings"])
    assert ids.dtype == torch.int32 and ids.shape == (5, 77)
    assert torch.equal(ids, goldens["tokens_ids"])


def test_vocabulary_layout(tok):
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert (
        table[ord("a")] == "a"
        and table[ord("ÿ")] == "ÿ"
        and table[0] == chr(256)
        and table[ord(" ")] == chr(288)
    )
    assert len(tok.encoder) == 49408 and len(tok.ranks) == 48894
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256
    assert tok.encoder["<|startoftext|>"] == SOT_ID and tok.encoder["<|endoftext|>"] == EOT_ID


@pytest.mark.parametrize(
    "text, ids",
    [
        ("brain", [4812]),
        ("liver", [12639]),
        ("retinal oct", [31270, 566, 4565]),
        ("chest x-ray film", [10563, 343, 268, 3077, 1860]),
        ("histopathological image", [677, 6005, 64, 1325, 4791, 2867]),
        ("Chest X-ray film", [10563, 343, 268, 3077, 1860]),  # lower-cased before BPE
    ],
)
def test_spec_examples(tok, text, ids):
    assert tok.encode(text) == ids
    row = tokenize(text)[0]
    assert row[: len(ids) + 2].tolist() == [SOT_ID, *ids, EOT_ID] and not row[len(ids) + 2 :].any()


def test_cleaning(tok):
    assert tok.encode("cafÃ©") == tok.encode("café")  # ftfy repairs mojibake
    assert tok.encode("doesnÃ¢â‚¬â„¢t") == tok.encode("doesn’t") == [2503, 713]
    assert tok.encode("&amp;lt;b&amp;gt;") == tok.encode("<b>")  # unescaped twice
    assert tok.encode("  Flawless \t\n Brain  ") == tok.encode("flawless brain") == [15531, 4812]


def test_special_tokens_stay_whole(tok):
    assert tok.encode("<|startoftext|>a<|endoftext|>") == [SOT_ID, 320, EOT_ID]


@pytest.mark.parametrize("name, longest", PROMPT_LENGTHS.items())
def test_longest_prompt(name, longest):
    sentences = prompts(name)
    assert len(sentences) == 420
    assert max_length(sentences) == longest
    assert int((tokenize(sentences) != 0).sum(1).max()) == longest


def test_matches_open_clip(tok, oracle):
    # the five distinct names of the six datasets (Retina_RESC and Retina_OCT2017 both use 'retinal OCT')
    texts = [p for name in PROMPT_LENGTHS for p in prompts(name)] + varied_strings()
    reference = oracle.SimpleTokenizer()
    mismatches = [t for t in texts if tok.encode(t) != reference.encode(t)]
    assert not mismatches, f"{len(mismatches)} strings differ from open_clip, e.g. {mismatches[:3]!r}"
    hard = varied_strings()
    assert sum(len(tok.encode(t)) + 2 > 77 for t in hard) >= 7  # truncation is exercised too
    assert torch.equal(tokenize(hard, truncate=True).long(), oracle.tokenize(hard))
    ids = [tok.encode(t) for t in hard[:60]]
    assert [tok.decode(i) for i in ids] == [reference.decode(i) for i in ids]


def test_too_long_raises_and_truncate():
    text = "histopathological image " * 20  # 6 ids per repetition: 122 with SOT/EOT
    with pytest.raises(
        ValueError,
        match=r"^text 'histopathological image histopathologica'\.\.\. is 122 tokens long "
        r".*context_length=77; pass truncate=True",
    ) as err:
        tokenize(["fine", text])
    assert "\n" not in str(err.value)
    cut = tokenize(["fine", text], truncate=True)
    assert cut.shape == (2, 77) and cut[1, -1] == EOT_ID and cut[1, 0] == SOT_ID
    assert cut[1, 1:7].tolist() == [677, 6005, 64, 1325, 4791, 2867]
    assert tokenize(text, context_length=130)[0, 121] == EOT_ID  # fits a longer context untouched


def test_exact_fit_and_empty():
    assert tokenize("")[0, :3].tolist() == [SOT_ID, EOT_ID, 0]
    text = "a " * 75  # 75 ids + SOT + EOT = 77: fits exactly
    assert tokenize(text)[0, -1] == EOT_ID
    with pytest.raises(ValueError, match="78 tokens long"):
        tokenize(text + "a")
    assert tokenize([]).shape == (0, 77) and max_length([]) == 0


def test_decode_round_trip(tok):
    for text in [
        "a photo of a brain",
        "histopathological image with damage",
        "retinal oct without flaw",
        "abc xyz",
    ]:
        assert tok.decode(tok.encode(text)) == text + " "  # every word ends with '</w>', decoded as a space
