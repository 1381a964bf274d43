"""The text-feature cache: a hit is the tensor an encoding gives, bit for bit; a damaged or foreign entry is
encoded again and replaced; every setting the features depend on keys the entry."""

import torch
from conftest import TINY_MODEL

from mvfa.config import ModelConfig
from mvfa.precision import Precision
from mvfa.text_cache import text_cache
from prompt import text_features_for

CPU = torch.device("cpu")


def encode(model, store, name="Brain", precision="fp32"):
    return text_features_for(model.clipmodel, [name], CPU, Precision.of(precision, CPU), store)[name]


def test_hit_equals_a_fresh_encoding_and_damage_is_encoded_again(tmp_path):
    fp32 = Precision.of("fp32", CPU)
    model = TINY_MODEL.build(CPU, fp32)
    store = text_cache(TINY_MODEL, fp32, CPU, tmp_path)
    fresh = encode(model, None)
    written = encode(model, store)
    entries = sorted((tmp_path / "text").glob("*.pt"))
    assert len(entries) == 1 and torch.equal(written, fresh)

    calls = []
    real = model.clipmodel.encode_text

    def counted(tokens):
        calls.append(len(tokens))
        return real(tokens)

    model.clipmodel.encode_text = counted
    hit = encode(model, store)
    assert calls == [] and torch.equal(hit, fresh) and hit.dtype == fresh.dtype

    entry = torch.load(entries[0], weights_only=True)
    entry["features"][0, 0] += 1e-3  # a changed value under the old checksum
    torch.save(entry, entries[0])
    again = encode(model, store)
    assert len(calls) == 2 and torch.equal(again, fresh)  # normal and abnormal sentences encoded anew
    entries[0].write_bytes(b"not a torch file")
    assert torch.equal(encode(model, store), fresh) and len(calls) == 4
    assert torch.equal(torch.load(entries[0], weights_only=True)["features"], fresh)  # replaced


def test_entries_are_keyed_by_prompt_precision_and_text_path(tmp_path):
    fp32 = Precision.of("fp32", CPU)
    model = TINY_MODEL.build(CPU, fp32)
    encode(model, text_cache(TINY_MODEL, fp32, CPU, tmp_path), "Brain")
    encode(model, text_cache(TINY_MODEL, fp32, CPU, tmp_path), "Liver")
    bf16 = Precision.of("bf16", CPU)
    encode(model, text_cache(TINY_MODEL, bf16, CPU, tmp_path), "Brain", "bf16")
    fast = ModelConfig(**{**TINY_MODEL.__dict__, "fast": True})
    encode(model, text_cache(fast, fp32, CPU, tmp_path), "Brain")
    assert len(list((tmp_path / "text").glob("*.pt"))) == 4


def test_weights_file_digest_is_remembered_and_renewed(tmp_path):
    from mvfa.text_cache import file_digest

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a" * 100)
    first = file_digest(weights, tmp_path / "cache")
    assert first == file_digest(weights, tmp_path / "cache")
    weights.write_bytes(b"b" * 101)
    assert file_digest(weights, tmp_path / "cache") != first
