import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fsam_ds.trainer.data.batches import ShardSampler, build_dataloader, padding_collator, set_epoch, tokenize
from fsam_ds.trainer.data.checks import TEXT_A, DataError
from fsam_ds.trainer.data.splits import load_task_splits, sample_per_class
from fsam_ds.trainer.tasks import get_task

WORDS = "the a cat dog sat on mat is good bad film movie bank river money word : . ?".split()


def make_tokenizer(with_token_types: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: BERT-like (token types) or RoBERTa-like (none)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    names = ["input_ids", "token_type_ids", "attention_mask"] if with_token_types else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=names)


@pytest.fixture(scope="module")
def bert_tokenizer():
    return make_tokenizer(True)


@pytest.fixture(scope="module")
def roberta_tokenizer():
    return make_tokenizer(False)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def labels_of(ds):
    return list(ds["label"])


# ------------------------------------------------------------------------------- GLUE TSV folders

def test_cola_headerless_tsv(tmp_path):
    write(tmp_path / "train.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\nbc01\t1\t\tA dog sat.\n")
    write(tmp_path / "dev.tsv", "cj99\t0\t*\tSat sat the.\n")
    splits = load_task_splits("cola", "glue-tsv", data_dir=tmp_path)
    assert set(splits) == {"train", "validation"}
    assert list(splits["train"]["text_a"]) == ["The cat sat.", "Cat the sat.", "A dog sat."]
    assert labels_of(splits["train"]) == [1, 0, 1]
    assert labels_of(splits["validation"]) == [0]


def test_cola_tsv_with_a_header_row_is_also_read(tmp_path):
    write(tmp_path / "train.tsv", "sentence\tlabel\nThe cat sat.\t1\n")
    write(tmp_path / "dev.tsv", "label\tsentence\n0\tCat the sat.\n")
    splits = load_task_splits("cola", "glue-tsv", data_dir=tmp_path)
    assert list(splits["train"]["text_a"]) == ["The cat sat."] and labels_of(splits["validation"]) == [0]


def test_sst2_tsv_keeps_quotes_verbatim(tmp_path):
    write(tmp_path / "train.tsv", 'sentence\tlabel\na "good" film \t1\nbad movie\t0\n')
    write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    train = load_task_splits("sst2", "glue-tsv", data_dir=tmp_path)["train"]
    assert list(train["text_a"]) == ['a "good" film ', "bad movie"]
    assert labels_of(train) == [1, 0]


def test_mrpc_tsv_with_byte_order_mark_and_glue_header(tmp_path):
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(tmp_path / "train.tsv", header + "1\t11\t12\tThe cat sat.\tA cat sat.\n0\t13\t14\tA dog.\tThe mat.\n")
    write(tmp_path / "dev.tsv", header + "1\t15\t16\tGood film.\tGood movie.\n")
    train = load_task_splits("mrpc", "glue-tsv", data_dir=tmp_path)["train"]
    assert list(train["text_a"]) == ["The cat sat.", "A dog."]
    assert list(train["text_b"]) == ["A cat sat.", "The mat."]
    assert labels_of(train) == [1, 0]


def test_mnli_tsv_maps_label_names_and_reads_both_dev_files(tmp_path):
    train_header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    dev_header = train_header.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
    train_row = "0\t1\t1a\tfiction\t(\t(\t(\t(\tA cat sat.\tA cat.\tneutral\tneutral\n"
    write(tmp_path / "train.tsv", train_header + train_row)

    def dev_row(label):
        return "0\t1\t1a\tfiction\t(\t(\t(\t(\tThe dog.\tA dog.\t" + "\t".join([label] * 6) + "\n"

    write(tmp_path / "dev_matched.tsv", dev_header + dev_row("contradiction") + dev_row("entailment"))
    write(tmp_path / "dev_mismatched.tsv", dev_header + dev_row("neutral"))
    splits = load_task_splits("mnli", "glue-tsv", data_dir=tmp_path)
    assert set(splits) == {"train", "validation_matched", "validation_mismatched"}
    assert labels_of(splits["train"]) == [1]
    assert labels_of(splits["validation_matched"]) == [2, 0]
    assert labels_of(splits["validation_mismatched"]) == [1]
    assert list(splits["train"]["text_a"]) == ["A cat sat."] and list(splits["train"]["text_b"]) == ["A cat."]


def test_stsb_tsv_scores_are_floats(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA cat sat.\tA cat is sitting.\t{}\n"
    write(tmp_path / "train.tsv", header + row.format("5.000") + row.format("3.8"))
    write(tmp_path / "dev.tsv", header + row.format("0.5"))
    splits = load_task_splits("stsb", "glue-tsv", data_dir=tmp_path)
    assert splits["train"].features["label"].dtype == "float64"
    assert labels_of(splits["train"]) == [5.0, 3.8]


def test_qnli_and_qqp_tsv_layouts(tmp_path):
    qnli = tmp_path / "qnli"
    qnli.mkdir()
    write(qnli / "train.tsv", "index\tquestion\tsentence\tlabel\n0\tWhat sat?\tThe cat sat.\tnot_entailment\n")
    write(qnli / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tA dog.\tentailment\n")
    assert labels_of(load_task_splits("qnli", "glue-tsv", data_dir=qnli)["train"]) == [1]
    qqp = tmp_path / "qqp"
    qqp.mkdir()
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write(qqp / "train.tsv", header + "0\t1\t2\tIs a cat good?\tIs the cat good?\t1\n")
    write(qqp / "dev.tsv", header + "1\t3\t4\tA dog?\tA mat?\t0\n")
    train = load_task_splits("qqp", "glue-tsv", data_dir=qqp)["train"]
    assert list(train["text_b"]) == ["Is the cat good?"] and labels_of(train) == [1]


def test_rows_of_the_wrong_width_warn_or_raise(tmp_path):
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood film\t1\nbroken\n bad\t0\ntoo\tmany\tfields\nblank\t\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.warns(UserWarning, match=r"skipped 2 row.*header's 2: row 2 after the header has fewer fields; "
                                         r"Skipping line 5: Expected 2 fields in line 5, saw 3\.$"):
        with pytest.raises(DataError, match=r"label.*'' \(1 row\)"):  # a blank field is there, not missing
            load_task_splits("sst2", "glue-tsv", data_dir=tmp_path)
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood film\t1\nbroken\n bad\t0\ntoo\tmany\tfields\n")
    with pytest.warns(UserWarning, match=r"skipped 2 row"):
        train = load_task_splits("sst2", "glue-tsv", data_dir=tmp_path)["train"]
    assert list(train["text_a"]) == ["good film", " bad"] and labels_of(train) == [1, 0]
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood film\t1\nbroken\n bad\t0\n")
    with pytest.raises(DataError, match=r"train.tsv: row\(s\) 2 \(counted after the header\) have fewer fields than "
                                        r"the header's 2 \(sentence, label\).*bad_rows='warn'"):
        load_task_splits("sst2", "glue-tsv", data_dir=tmp_path, bad_rows="error")
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood film\t1\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match=r"train.tsv could not be read \(ParserError: Expected 2 fields in "
                                        r"line 3, saw 3\).*bad_rows='warn'"):
        load_task_splits("sst2", "glue-tsv", data_dir=tmp_path, bad_rows="error")


def test_readers_that_keep_every_row_refuse_a_bad_row_without_offering_to_skip_it(tmp_path):
    """fsam-predict and the generation tasks read every row (a skipped row would misalign the output):
    the error names the row and asks for a repair, not for an option those commands do not have."""
    from fsam_ds.trainer.data.readers import read_table

    write(tmp_path / "short.csv", "text,label\ngood film,1\nbroken\n")
    write(tmp_path / "long.csv", "text,label\ngood film,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"short.csv: row\(s\) 2 .*fewer fields") as short:
        read_table(tmp_path / "short.csv")
    with pytest.raises(DataError, match=r"long.csv could not be read .*Expected 2 fields in line 3") as long:
        read_table(tmp_path / "long.csv")
    for err in (short, long):
        assert "bad_rows" not in str(err.value) and "never skipped" in str(err.value)


def test_missing_glue_file_names_the_expected_files(tmp_path):
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"dev_matched.tsv not found.*dev_mismatched.tsv"):
        load_task_splits("mnli", "glue-tsv", data_dir=tmp_path, splits=("validation_matched",))


# ----------------------------------------------------------------------------------- local files

def test_polarity_csv_maps_minus_one_to_zero(tmp_path):
    write(tmp_path / "train.csv", 'text,label\n"a good, good film",1\nbad movie,-1\n"the ""cat"" film",1\n')
    write(tmp_path / "dev.csv", "text,label\nbad,-1\n")
    splits = load_task_splits("polarity", "files",
                              data_files={"train": tmp_path / "train.csv", "validation": tmp_path / "dev.csv"})
    assert list(splits["train"]["text_a"]) == ["a good, good film", "bad movie", 'the "cat" film']
    assert labels_of(splits["train"]) == [1, 0, 1]
    assert labels_of(splits["validation"]) == [0]
    assert splits["train"].features["label"].names == ["neg", "pos"]


def test_json_array_jsonl_and_parquet(tmp_path):
    rows = [{"question": "Is the cat good?", "passage": "The cat is good.", "label": True, "idx": 0},
            {"question": "Is the dog bad?", "passage": "The dog is good.", "label": False, "idx": 1}]
    write(tmp_path / "train.json", json.dumps(rows))
    write(tmp_path / "val.jsonl", "\n".join(json.dumps(r) for r in rows[::-1]) + "\n")
    splits = load_task_splits("boolq", "files",
                              data_files={"train": tmp_path / "train.json", "validation": tmp_path / "val.jsonl"})
    assert labels_of(splits["train"]) == [1, 0] and labels_of(splits["validation"]) == [0, 1]
    assert list(splits["validation"]["text_a"]) == ["Is the dog bad?", "Is the cat good?"]

    table = pa.table({"premise": ["A cat sat.", "A dog sat.", "The mat."], "hypothesis": ["Cat.", "No dog.", "Mat?"],
                      "label": [0, 1, 2]})
    pq.write_table(table, tmp_path / "cb.parquet")
    cb = load_task_splits("cb", "files", data_files={"train": tmp_path / "cb.parquet"}, splits=("train",))
    assert labels_of(cb["train"]) == [0, 1, 2] and list(cb["train"]["text_b"]) == ["Cat.", "No dog.", "Mat?"]


def test_json_object_of_columns_and_generic_tsv(tmp_path):
    write(tmp_path / "train.json", json.dumps({"sentence": ["good film", "bad film"], "label": [1, 0]}))
    write(tmp_path / "dev.tsv", "label\tsentence\n0\tbad\n")
    splits = load_task_splits("sst2", "files",
                              data_files={"train": tmp_path / "train.json", "validation": tmp_path / "dev.tsv"})
    assert labels_of(splits["train"]) == [1, 0] and list(splits["validation"]["text_a"]) == ["bad"]


def test_user_column_mapping(tmp_path):
    write(tmp_path / "train.csv", "review,stars\ngood film,positive\nbad film,negative\n")
    splits = load_task_splits("sst2", "files", data_files={"train": tmp_path / "train.csv"}, splits=("train",),
                              columns={"review": "sentence", "stars": "label"})
    assert list(splits["train"]["text_a"]) == ["good film", "bad film"] and labels_of(splits["train"]) == [1, 0]


def test_wic_text_is_built_from_the_template(tmp_path):
    rows = [{"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank money.", "label": False,
             "start1": 10, "end1": 14}]
    write(tmp_path / "train.jsonl", json.dumps(rows[0]) + "\n")
    train = load_task_splits("wic", "files", data_files={"train": tmp_path / "train.jsonl"}, splits=("train",))["train"]
    assert list(train["text_a"]) == ["bank: The river bank."] and list(train["text_b"]) == ["The bank money."]


def test_axb_trains_on_rte_columns_and_tests_on_its_own(tmp_path):
    write(tmp_path / "rte.jsonl", json.dumps({"premise": "A cat sat.", "hypothesis": "A cat.",
                                              "label": "entailment"}) + "\n")
    write(tmp_path / "axb.jsonl", json.dumps({"sentence1": "The dog.", "sentence2": "No dog.",
                                              "label": "not_entailment", "logic": "Negation"}) + "\n")
    splits = load_task_splits("axb", "files", data_files={"train": tmp_path / "rte.jsonl",
                                                          "validation": tmp_path / "rte.jsonl",
                                                          "test": tmp_path / "axb.jsonl"})
    assert labels_of(splits["train"]) == [0] and labels_of(splits["test"]) == [1]
    assert list(splits["test"]["text_a"]) == ["The dog."]


@pytest.fixture
def hub_answers(monkeypatch):
    """The hub probe answers, without a request (each test fakes datasets.load_dataset itself)."""
    monkeypatch.setattr("fsam_ds.trainer.data.splits._hub_unreachable", lambda: None)


def test_hub_path_calls_load_dataset_with_the_task_config(monkeypatch, hub_answers):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return Dataset.from_dict({"sentence1": ["A cat.", "A dog."], "sentence2": ["Cat.", "Dog?"],
                                  "label": [0, 1], "idx": [0, 1]})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    splits = load_task_splits("mrpc", "hub", hub_kwargs={"revision": "main"})
    assert calls == [("nyu-mll/glue", "mrpc", "train", {"revision": "main"}),
                     ("nyu-mll/glue", "mrpc", "validation", {"revision": "main"})]
    assert labels_of(splits["validation"]) == [0, 1] and list(splits["train"]["text_b"]) == ["Cat.", "Dog?"]


def test_hub_test_split_minus_one_labels_are_explained(monkeypatch, hub_answers):
    monkeypatch.setattr("datasets.load_dataset",
                        lambda path, name=None, split=None, **kw: Dataset.from_dict({"sentence": ["x"], "label": [-1]}))
    with pytest.raises(DataError, match="unlabelled test examples"):
        load_task_splits("sst2", "hub", splits=("test",))


# ---------------------------------------------------------------------------------------- errors

def test_missing_column_names_column_file_and_present_columns(tmp_path):
    path = write(tmp_path / "train.csv", "sentence1,label,extra\nA cat.,1,x\n")
    with pytest.raises(DataError) as err:
        load_task_splits("mrpc", "files", data_files={"train": path}, splits=("train",))
    message = str(err.value)
    assert "'sentence2'" in message
    assert str(path) in message
    assert "'sentence1', 'label', 'extra'" in message
    assert "columns={'<column in the data>': 'sentence2'}" in message


def test_glue_file_given_as_plain_tsv_points_to_glue_tsv(tmp_path):
    path = write(tmp_path / "train.tsv", "gj04\t1\t\tThe cat sat.\n")
    with pytest.raises(DataError, match="source='glue-tsv'"):
        load_task_splits("cola", "files", data_files={"train": path}, splits=("train",))


def test_label_outside_the_set_names_value_count_and_allowed_set(tmp_path):
    path = write(tmp_path / "train.csv", "sentence,label\na,1\nb,2\nc,2\nd,positive\ne,maybe\n")
    with pytest.raises(DataError) as err:
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",))
    message = str(err.value)
    assert str(path) in message
    assert "3 label(s)" in message
    assert "'2' (2 rows)" in message and "'maybe' (1 row)" in message
    assert "0..1" in message and "'negative', 'positive'" in message


def test_regression_labels_must_be_numbers(tmp_path):
    path = write(tmp_path / "train.csv", "sentence1,sentence2,label\na,b,4.5\nc,d,high\ne,f,\n")
    with pytest.raises(DataError, match=r"2 label\(s\) that are not finite numbers: 'high' \(1 row\), '' \(1 row\)"):
        load_task_splits("stsb", "files", data_files={"train": path}, splits=("train",))


def test_null_text_is_an_error(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": null, "label": 0}\n')
    with pytest.raises(DataError, match=r"column 'sentence' is null in 1 row\(s\) \(rows 1\)"):
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",))


def test_data_files_keys_must_be_split_names(tmp_path):
    path = write(tmp_path / "train.csv", "sentence,label\na,1\n")
    with pytest.raises(DataError, match=r"missing: 'validation'"):
        load_task_splits("sst2", "files", data_files={"train": path, "dev": path})


def test_broken_json_lines_name_the_file_and_the_expected_form(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0\n')
    with pytest.raises(DataError, match=r"train.jsonl could not be read \(ArrowInvalid: JSON parse error.*\). "
                                        r"Each line of a JSON lines file must hold one complete object"):
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",))
    columns = write(tmp_path / "train.json", json.dumps({"sentence": ["a", "b"], "label": [1]}))
    with pytest.raises(DataError, match=r"column lists have different lengths \({'sentence': 2, 'label': 1}\)"):
        load_task_splits("sst2", "files", data_files={"train": columns}, splits=("train",))
    nested = write(tmp_path / "nested.json", json.dumps({"data": [{"sentence": "good", "label": 1}]}))
    assert list(load_task_splits("sst2", "files", data_files={"train": nested},
                                 splits=("train",))["train"]["text_a"]) == ["good"]


def test_json_lines_that_mix_types_in_a_column_or_hold_one_line(tmp_path):
    from fsam_ds.trainer.data.readers import read_table

    mixed = write(tmp_path / "mixed.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": "neg"}')
    with pytest.raises(DataError, match=r"'neg' \(1 row\)"):  # read as it is written, then checked
        load_task_splits("sst2", "files", data_files={"train": mixed}, splits=("train",))
    write(mixed, '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": "negative"}')
    train = load_task_splits("sst2", "files", data_files={"train": mixed}, splits=("train",))["train"]
    assert labels_of(train) == [1, 0]
    # one JSON lines example whose every field is a list stays one example, not an object of column lists
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert read_table(write(tmp_path / "chat.jsonl", json.dumps({"messages": turns}) + "\n")) == {"messages": [turns]}
    assert read_table(write(tmp_path / "chat.json", json.dumps({"messages": turns}))) == {"messages": turns}


def test_stray_quote_in_a_csv_names_the_line(tmp_path):
    path = write(tmp_path / "train.csv", 'sentence,label\ngood,1\n"bad" film,0\n')
    for bad_rows in ("warn", "error"):
        with pytest.raises(DataError, match=r"train.csv could not be read \(ParserError: .* in line 3\)"):
            load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",), bad_rows=bad_rows)


def test_unsupported_extension(tmp_path):
    path = write(tmp_path / "train.txt", "a\t1\n")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",))


# ---------------------------------------------------------------------------------- limited data

def labelled(labels, names=("neg", "pos", "mid")):
    return Dataset.from_dict({"text_a": [f"t{i}" for i in range(len(labels))], "label": labels}).cast_column(
        "label", ClassLabel(names=list(names)))


def test_sample_per_class_is_balanced_seeded_and_reproducible():
    ds = labelled([i % 3 for i in range(60)] + [0] * 30)
    first = sample_per_class(ds, 5, seed=1)
    again = sample_per_class(ds, 5, seed=1)
    other = sample_per_class(ds, 5, seed=2)
    assert sorted(labels_of(first)) == [0] * 5 + [1] * 5 + [2] * 5
    assert list(first["text_a"]) == list(again["text_a"])
    assert list(first["text_a"]) != list(other["text_a"])
    # A smaller draw with the same seed is part of the larger one.
    assert set(sample_per_class(ds, 3, seed=1)["text_a"]) <= set(first["text_a"])


def test_sample_per_class_errors_when_a_class_is_short():
    ds = labelled([0] * 10 + [1] * 10 + [2] * 2)
    with pytest.raises(DataError, match=r"class 'mid' has only 2 .*Use n <= 2"):
        sample_per_class(ds, 4, seed=0)


def test_sample_per_class_rejects_regression():
    ds = Dataset.from_dict({"text_a": ["a"], "label": [0.5]})
    with pytest.raises(DataError, match="regression"):
        sample_per_class(ds, 1, seed=0)


def test_train_per_class_applies_to_train_only(tmp_path):
    lines = "".join(f"s{i},{i % 2}\n" for i in range(20))
    train = write(tmp_path / "train.csv", "sentence,label\n" + lines)
    dev = write(tmp_path / "dev.csv", "sentence,label\n" + lines)
    splits = load_task_splits("sst2", "files", data_files={"train": train, "validation": dev},
                              train_per_class=3, seed=7)
    assert sorted(labels_of(splits["train"])) == [0, 0, 0, 1, 1, 1]
    assert len(splits["validation"]) == 20


# ---------------------------------------------------------------------------------- tokenization

def pair_split():
    return Dataset.from_dict({"text_a": ["the cat sat on the mat", "a dog"], "text_b": ["a cat", "the dog is good"],
                              "label": [1, 0]}).cast_column("label", ClassLabel(names=["no", "yes"]))


def test_tokenize_pair_with_token_types(bert_tokenizer):
    out = tokenize(pair_split(), bert_tokenizer, max_length=64)
    assert set(out.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    first = out[0]
    assert first["labels"].dtype == torch.int64 and first["labels"].item() == 1
    # [CLS] the cat sat on the mat [SEP] a cat [SEP]
    assert first["input_ids"].tolist() == bert_tokenizer("the cat sat on the mat", "a cat")["input_ids"]
    assert first["token_type_ids"].tolist() == [0] * 8 + [1] * 3


def test_tokenize_without_token_types_and_regression_labels(roberta_tokenizer):
    ds = Dataset.from_dict({"text_a": ["good film"], "text_b": ["bad film"], "label": [3.5]})
    out = tokenize(ds, roberta_tokenizer, max_length=64)
    assert set(out.column_names) == {"input_ids", "attention_mask", "labels"}
    assert out[0]["labels"].dtype == torch.float32 and out[0]["labels"].item() == pytest.approx(3.5)


def test_tokenize_truncates_to_max_length(bert_tokenizer):
    out = tokenize(pair_split(), bert_tokenizer, max_length=6)
    assert [len(x) for x in out["input_ids"]] == [6, 6]


# ------------------------------------------------------------------------------- dynamic padding

def test_collator_pads_to_the_batch_max_not_a_global_max(bert_tokenizer):
    ds = Dataset.from_dict({"text_a": ["cat", "the cat sat", "the cat sat on the mat is good bad film"],
                            "label": [0, 1, 0]}).cast_column("label", ClassLabel(names=["a", "b"]))
    tokens = tokenize(ds, bert_tokenizer, max_length=64)
    collate = padding_collator(bert_tokenizer)
    short = collate([tokens[0], tokens[1]])
    assert short["input_ids"].shape == (2, 5)  # longest of the two is [CLS] the cat sat [SEP]
    assert short["input_ids"][0].tolist() == [2, bert_tokenizer.convert_tokens_to_ids("cat"), 3, 0, 0]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert short["token_type_ids"].shape == (2, 5)
    assert short["labels"].tolist() == [0, 1] and short["labels"].dtype == torch.int64
    assert collate([tokens[0], tokens[2]])["input_ids"].shape == (2, 12)
    assert padding_collator(bert_tokenizer, pad_to_multiple_of=8)([tokens[0], tokens[1]])["input_ids"].shape == (2, 8)


def test_collator_left_padding_and_regression_labels():
    tokenizer = make_tokenizer(True)
    tokenizer.padding_side = "left"
    batch = padding_collator(tokenizer)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 0.5},
                                         {"input_ids": [5], "attention_mask": [1], "labels": 4.25}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 5]]  # [PAD] is id 0
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 4.25]


def test_collator_needs_a_pad_token():
    tokenizer = make_tokenizer(False)
    tokenizer.pad_token = None
    with pytest.raises(DataError, match="has no pad token.*set tokenizer.pad_token"):
        padding_collator(tokenizer)


# --------------------------------------------------------------------------------- sharded loading

INDEX_COLLATE = padding_collator(make_tokenizer(True))  # pads the index datasets below


def index_dataset(n):
    return [{"input_ids": [i + 1], "labels": i} for i in range(n)]


def loader_labels(loader):
    return [i for batch in loader for i in batch["labels"].tolist()]


@pytest.mark.parametrize("n, world", [(24, 4), (23, 4), (10, 3)])
def test_training_shards_are_disjoint_equal_and_cover(n, world):
    collate = INDEX_COLLATE
    shards = [loader_labels(build_dataloader(index_dataset(n), collate, batch_size=2, train=True, seed=3,
                                             rank=r, world_size=world)) for r in range(world)]
    seen = [i for s in shards for i in s]
    assert len(seen) == len(set(seen))  # disjoint
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    assert n - len(seen) < world and (n % world != 0 or len(seen) == n)  # cover (up to < world left out)


def test_training_shuffle_is_seeded_and_changes_per_epoch():
    def epoch_order(seed, epoch):
        loader = build_dataloader(index_dataset(32), INDEX_COLLATE, batch_size=4, train=True, seed=seed,
                                  rank=1, world_size=2)
        set_epoch(loader, epoch)
        return loader_labels(loader)

    assert epoch_order(0, 0) == epoch_order(0, 0)
    assert epoch_order(0, 0) != epoch_order(0, 1)
    assert epoch_order(0, 0) != epoch_order(1, 0)
    assert sorted(epoch_order(0, 0)) != list(range(0, 32, 2))  # shuffled, not strided


@pytest.mark.parametrize("n, world", [(10, 4), (12, 4), (3, 4)])
def test_eval_shards_cover_every_example_once_with_equal_lengths(n, world):
    loaders = [build_dataloader(index_dataset(n), INDEX_COLLATE, batch_size=1, train=False, rank=r,
                                world_size=world) for r in range(world)]
    real = [loader_labels(loader)[:loader.sampler.num_real] for loader in loaders]
    assert sorted(i for s in real for i in s) == list(range(n))
    assert len({len(loader) for loader in loaders}) == 1


def test_shard_sampler_without_padding():
    shards = [list(ShardSampler(7, rank=r, world_size=3, even=False)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_loader_argument_errors():
    with pytest.raises(ValueError, match=r"rank = 2 must be an integer in \[0, world_size\)"):
        build_dataloader(index_dataset(4), INDEX_COLLATE, batch_size=1, train=True, rank=2, world_size=2)
    with pytest.raises(DataError, match="cannot fill 4 ranks"):
        build_dataloader(index_dataset(3), INDEX_COLLATE, batch_size=1, train=True, world_size=4)


def test_end_to_end_files_to_batches(tmp_path, bert_tokenizer):
    lines = "".join(f"{'the cat sat ' * (i % 4 + 1)},{1 if i % 2 else -1}\n" for i in range(12))
    path = write(tmp_path / "train.csv", "text,label\n" + lines)
    train = load_task_splits("polarity", "files", data_files={"train": path}, splits=("train",),
                             train_per_class=4, seed=0)["train"]
    tokens = tokenize(train, bert_tokenizer, max_length=16)
    loader = build_dataloader(tokens, padding_collator(bert_tokenizer), batch_size=4, train=True,
                              world_size=2, rank=0)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 4
    assert batches[0]["attention_mask"].sum(1).max() == batches[0]["input_ids"].shape[1]
    assert get_task("polarity").num_labels == 2
    assert TEXT_A in train.column_names


def test_sample_per_class_draw_of_a_class_ignores_the_other_classes():
    base = [i % 3 for i in range(60)]
    more_of_class_0 = labelled(base + [0] * 9)
    picks = sample_per_class(labelled(base), 4, seed=5)
    picks_after = sample_per_class(more_of_class_0, 4, seed=5)
    for class_id in (1, 2):
        assert ([t for t, y in zip(picks["text_a"], picks["label"]) if y == class_id]
                == [t for t, y in zip(picks_after["text_a"], picks_after["label"]) if y == class_id])


def test_hub_missing_column_lists_every_column_of_the_hub_split(monkeypatch, hub_answers):
    monkeypatch.setattr("datasets.load_dataset", lambda path, name=None, split=None, **kw: Dataset.from_dict(
        {"premise": ["a"], "hypothesis": ["b"], "label": [0], "idx": [0]}))
    with pytest.raises(DataError, match=r"'nyu-mll/glue', config 'rte', split 'train', has no column 'sentence1'"
                                        r".*Columns present: 'premise', 'hypothesis', 'label', 'idx'"):
        load_task_splits("rte", "hub", splits=("train",))


def test_float_written_class_labels_are_accepted(tmp_path):
    path = write(tmp_path / "train.csv", "sentence,label\na,1.0\nb, 0 \nc,-1.0\n")
    with pytest.raises(DataError, match=r"'-1.0' \(1 row\)"):
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",))
    polarity = write(tmp_path / "polarity.csv", "text,label\na,1.0\nb,-1.0\n")
    assert labels_of(load_task_splits("polarity", "files", data_files={"train": polarity},
                                      splits=("train",))["train"]) == [1, 0]


# --------------------------------------------------------------------- data errors users hit, one paragraph each

def test_header_only_csv_names_the_file_and_the_fix(tmp_path):
    train = write(tmp_path / "train.csv", "sentence,label\na good film,1\n")
    dev = write(tmp_path / "dev.csv", "sentence,label\n")
    with pytest.raises(DataError) as err:
        load_task_splits("sst2", "files", data_files={"train": train, "validation": dev})
    message = str(err.value)
    assert f"File {str(dev)!r} has no examples (only a header row" in message
    assert "data.dev_file" in message and "\n" not in message


def test_split_left_empty_after_skipping_every_row(tmp_path):
    write(tmp_path / "train.tsv", "sentence\tlabel\nbroken\nalso broken\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.warns(UserWarning, match="skipped 2 row"):
        with pytest.raises(DataError, match=r"train.tsv' has no examples"):
            load_task_splits("sst2", "glue-tsv", data_dir=tmp_path)


def test_latin1_csv_names_the_file_and_the_encoding_option(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("sentence,label\ncafé crème,1\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",))
    message = str(err.value)
    assert str(path) in message and "is not valid utf-8 text" in message
    assert "--data.encoding=latin-1" in message and "encoding='latin-1'" in message
    train = load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",), encoding="latin-1")
    assert list(train["train"]["text_a"]) == ["café crème"]
    lines = tmp_path / "train.jsonl"
    lines.write_bytes('{"sentence": "café", "label": 0}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"train.jsonl is not valid utf-8 text"):
        load_task_splits("sst2", "files", data_files={"train": lines}, splits=("train",))
    assert list(load_task_splits("sst2", "files", data_files={"train": lines}, splits=("train",),
                                 encoding="latin-1")["train"]["text_a"]) == ["café"]
    with pytest.raises(DataError, match=r"data.encoding = 'latin-9' is not a text encoding"):
        load_task_splits("sst2", "files", data_files={"train": path}, splits=("train",), encoding="latin-9")


@pytest.fixture
def no_hub_download(monkeypatch):
    """datasets.load_dataset fails the test if called: the error must come before any download attempt."""
    def refuse(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called; it retries an unreachable hub for ~25 s")

    monkeypatch.setattr("datasets.load_dataset", refuse)


def test_unreachable_hub_fails_fast_and_offers_local_files(monkeypatch, no_hub_download):
    import datasets
    from dist_harness import free_port

    # nothing listens on a just-freed local port: the connection is refused at once, without the network
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError) as err:
        load_task_splits("sst2", "hub")
    message = str(err.value)
    assert "Cannot load the hub dataset 'nyu-mll/glue', config 'sst2' (task 'sst2')" in message
    assert "does not answer (URLError: " in message and "HF_HUB_OFFLINE=1" in message
    assert "data.source=local with data.train_file and data.dev_file" in message and "\n" not in message


def test_offline_hub_without_the_dataset_in_the_cache(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    def unreachable():
        raise AssertionError("offline: the hub must not be probed")

    monkeypatch.setattr("fsam_ds.trainer.data.splits._hub_unreachable", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"the hub is switched off \(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE\) and "
                                        r"the dataset is not in the datasets cache.*data.source=local"):
        load_task_splits("sst2", "hub", hub_kwargs={"cache_dir": str(tmp_path)})
