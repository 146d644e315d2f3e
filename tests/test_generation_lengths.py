"""Generation lengths are checked at the start of a run against the positions of the model: a model
with learned position embeddings (GPT-2, BART) cannot index past its table, and the evaluation's
generation after training would otherwise fail with an IndexError in the position embedding."""

from __future__ import annotations

import pytest
import torch

from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.model_loading import check_positions
from fsam_ds.trainer.run_config import load_config


def _cfg(task: str, max_length: int, max_new_tokens: int):
    return load_config([f"--task={task}", "--model=m", f"--data.max_length={max_length}",
                        f"--eval.max_new_tokens={max_new_tokens}"])


def test_causal_lm_prompt_plus_generation_must_fit_learned_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=50)
    check_positions(_cfg("causal-lm", 32, 32), config)  # 64: fits exactly
    with pytest.raises(ConfigError) as refused:
        check_positions(_cfg("causal-lm", 48, 32), config)
    message = str(refused.value)
    assert "data.max_length + eval.max_new_tokens = 48 + 32 = 80 tokens, more than the 64 positions" in message
    assert "Lower eval.max_new_tokens to 16 or data.max_length to 32" in message
    # what the check prevents: 80 positions through GPT-2's table of 64
    with pytest.raises(IndexError):
        GPT2LMHeadModel(config)(torch.zeros(1, 80, dtype=torch.long))


def test_seq2seq_checks_source_and_generation_and_relative_positions_pass():
    from transformers import BartConfig, T5Config

    bart = BartConfig(max_position_embeddings=40, d_model=16, encoder_layers=1, decoder_layers=1)
    check_positions(_cfg("seq2seq", 40, 39), bart)
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens \+ 1\) = max\(40, 41\) = 41 tokens"):
        check_positions(_cfg("seq2seq", 40, 40), bart)
    check_positions(_cfg("seq2seq", 512, 512), T5Config())  # relative positions: no table to run out of
    check_positions(_cfg("sst2", 512, 512), bart)  # classification generates nothing


def test_rotary_models_are_warned_not_refused(capsys):
    from transformers import LlamaConfig

    check_positions(_cfg("causal-lm", 48, 32), LlamaConfig(max_position_embeddings=64))
    assert "more than the 64 positions" in capsys.readouterr().err
