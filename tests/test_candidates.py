"""The default Fisher candidate rule treats embeddings alike in encoder and decoder models."""

from __future__ import annotations

import pytest
import torch

from fsam_ds.sam.candidates import embedding_parameter_names, fisher_candidates
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.optim import SAMOptimizer

transformers = pytest.importorskip("transformers")


def gpt2(tie: bool = True):
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg)


def llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


# Written out from each architecture's definition: the embedding tables, and the decoder output
# projection where it is tied to the token table (then named_parameters lists it only once). BERT's
# embedding LayerNorm is left out by the default name pattern `embed`, as before.
CASES = {
    "gpt2-tied": (lambda: gpt2(True), {"transformer.wte.weight", "transformer.wpe.weight"}, "lm_head.weight"),
    "gpt2-untied": (lambda: gpt2(False), {"transformer.wte.weight", "transformer.wpe.weight"}, None),
    "llama-tied": (lambda: llama(True), {"model.embed_tokens.weight"}, "lm_head.weight"),
    "llama-untied": (lambda: llama(False), {"model.embed_tokens.weight"}, None),
    "bert": (bert, {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                    "bert.embeddings.token_type_embeddings.weight"}, None),
}
BY_NAME_ONLY = {"bert": {"bert.embeddings.LayerNorm.weight"}
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_rule_leaves_out_embeddings_and_tied_heads(case):
    build, embeddings, tied_head = CASES[case]
    torch.manual_seed(0)
    model = build()
    names = [n for n, _ in model.named_parameters()]
    assert embeddings <= set(names)
    candidates = dict(zip(names, fisher_candidates(SAMConfig(), names, model)))
    # the reference: every weight that is neither a bias nor an embedding table is a candidate
    left_out = embeddings | BY_NAME_ONLY.get(case, set())
    expected = {n: not n.endswith(".bias") and n not in left_out for n in names}
    assert candidates == expected
    if tied_head is not None:
        assert tied_head not in names  # listed once, under the embedding's name
        assert tied_head in embedding_parameter_names(model)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        head = model.get_output_embeddings()
        if head is not None and not isinstance(model, transformers.BertForSequenceClassification):
            assert candidates[next(n for n, p in model.named_parameters() if p is head.weight)]


def test_name_rule_alone_misses_decoder_embeddings():
    """The deliberately wrong variant: names only (the rule before module types) keeps GPT-2's tables."""
    model = gpt2()
    names = [n for n, _ in model.named_parameters()]
    by_name = dict(zip(names, fisher_candidates(SAMConfig(), names)))
    assert by_name["transformer.wte.weight"] and by_name["transformer.wpe.weight"]
    off = dict(zip(names, fisher_candidates(SAMConfig(exclude_embeddings=False), names, model)))
    assert off == by_name


def test_name_patterns_still_apply_with_the_module():
    model = llama(False)
    names = [n for n, _ in model.named_parameters()]
    cfg = SAMConfig(candidate_exclude=("bias", "norm"))
    candidates = dict(zip(names, fisher_candidates(cfg, names, model)))
    assert not candidates["model.norm.weight"] and not candidates["model.layers.0.input_layernorm.weight"]
    assert not candidates["model.embed_tokens.weight"] and candidates["lm_head.weight"]


def test_sam_optimizer_marks_the_pieces_from_the_module():
    model = gpt2()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(), module=model, lr=0.1)
    marked = {p.name: p.candidate for p in opt.shards.pieces}
    assert not marked["transformer.wte.weight"] and not marked["transformer.wpe.weight"]
    assert marked["transformer.h.0.attn.c_attn.weight"] and not marked["transformer.h.0.attn.c_attn.bias"]


def test_a_rule_that_leaves_no_candidate_is_refused_before_any_step():
    """A Fisher type whose candidate_exclude matches every tensor is refused when the candidates are chosen
    (at SAMOptimizer / fsam_ds.initialize), not in the first step; non-Fisher types do not use the rule."""
    from fsam_ds.sam.config import ConfigError

    model = gpt2()
    names = [n for n, _ in model.named_parameters()]
    every = SAMConfig(sam_type="fisher-sam", candidate_exclude=("transformer", "lm_head"))
    with pytest.raises(ConfigError, match=r"candidate_exclude = \['transformer', 'lm_head'\] leaves no Fisher"):
        fisher_candidates(every, names, model)
    with pytest.raises(ConfigError, match="leaves no Fisher candidate"):
        SAMOptimizer(model.named_parameters(), torch.optim.SGD, every, module=model, lr=0.1)
    assert not any(fisher_candidates(SAMConfig(sam_type="sam", candidate_exclude=("transformer",)), names, model))
    assert any(fisher_candidates(SAMConfig(sam_type="fisher-sam", candidate_exclude=("transformer.h",)), names))
