"""Tiny generation models (a Llama-class decoder, a T5), their word-level tokenizer with a chat template,
and prompt/completion, chat and source/target files for the generation tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tokenizer(*, eos_after_text: bool = False, pad: bool = True):
    """A whitespace word-level fast tokenizer: pad 0, eos </s>, bos <s> added before a text for the
    decoder (not with `eos_after_text`, which appends </s> instead, as T5's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + ["copy", "reverse", ":"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    single = "$A </s>" if eos_after_text else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[
        ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None, chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=SPECIALS[4:], model_max_length=64)


def write_tiny_llama(folder: Path, tie: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_t5(folder: Path) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tokenizer(eos_after_text=True)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2,
                      num_heads=2, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """(instruction, answer): `copy` repeats the words, `reverse` reverses them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
        verb = "copy" if i % 2 else "reverse"
        out.append((f"{verb} : {' '.join(words)}", " ".join(words if verb == "copy" else words[::-1])))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_generation_files(folder: Path, n_train: int = 48, n_dev: int = 12) -> dict[str, Path]:
    """prompt/completion, chat and source/target jsonl files over the same pairs."""
    files = {}
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        data = pairs(n, seed)
        files[f"{split}_pc"] = write_jsonl(folder / f"{split}_pc.jsonl",
                                           [{"prompt": p, "completion": c} for p, c in data])
        files[f"{split}_chat"] = write_jsonl(folder / f"{split}_chat.jsonl", [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in data])
        files[f"{split}_s2s"] = write_jsonl(folder / f"{split}_s2s.jsonl",
                                            [{"source": p, "target": c} for p, c in data])
    return files


def generation_config(model: Path, files: dict[str, Path], task: str = "causal-lm", kind: str = "pc", **eval_keys):
    from fsam_ds.trainer.run_config import DataSection, EvalSection, TrainConfig

    return TrainConfig(task=task, model=str(model), data=DataSection(
        train_file=str(files[f"train_{kind}"]), dev_file=str(files[f"dev_{kind}"]), max_length=32),
        eval=EvalSection(**{"generate_examples": 8, "max_new_tokens": 6, **eval_keys}))


def run_zero3_generation(rank: int, world: int, task: str, model_dir: str, files: dict[str, Path]) -> dict:
    """This rank's greedy tokens for its shard of the dev split, through the objective on a ZeRO-3
    engine whose model was loaded partitioned (as the trainer does). Returns {example index: tokens}."""
    import deepspeed
    import torch
    from transformers import AutoTokenizer

    from ds_workers import ds_config
    from fsam_ds.trainer.model_loading import load_model
    from fsam_ds.trainer.data.batches import build_dataloader
    from fsam_ds.trainer.objectives import objective_for

    cfg = generation_config(Path(model_dir), files, task, "s2s" if task == "seq2seq" else "pc")
    objective = objective_for(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dev = objective.prepare_splits(tok)[objective.select_split]
    config = ds_config(3, stage3_param_persistence_threshold=0)  # every parameter gathered per forward
    model = load_model(cfg, objective, config)
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=torch.optim.AdamW(model.parameters()))
    engine.eval()
    # 3 per batch: 7 examples give rank 0 two batches of 4 real examples, rank 1 three real and one repeat
    loader = build_dataloader(dev.select(range(7)), objective.collator(tok), batch_size=3, train=False,
                              rank=rank, world_size=world)
    out = {}
    with torch.no_grad():
        for batch in loader:
            for index, tokens in zip(batch["example_index"].tolist(), objective.generate(engine, batch).tolist()):
                out[index] = tokens
    return out


def write_tiny_bert2bert(folder: Path) -> Path:
    """A warm-start-shaped EncoderDecoderModel (BERT encoder, BERT decoder with cross-attention) and a
    BERT tokenizer, which has SEP but no EOS token: generation starts at CLS and stops at SEP."""
    import torch
    from transformers import BertConfig, BertTokenizer, EncoderDecoderConfig, EncoderDecoderModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(specials + WORDS + ["copy", "reverse", ":"])})
    shape = dict(vocab_size=len(tok.vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**shape), BertConfig(**shape, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = (tok.cls_token_id, tok.pad_token_id,
                                                                               tok.sep_token_id)
    torch.manual_seed(0)
    model = EncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.sep_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
