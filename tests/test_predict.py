"""fsam-predict in-process (`main(argv)`) on exports of the tiny config-built models: one output line per
input row whatever the row holds (an empty text included), a blank line refused with its line number,
--max_new_tokens and the `truncated` mark of generations cut at that limit, and --version."""

from __future__ import annotations

import csv
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fsam_ds
import generation_fixtures as gf
import train_fixtures as fx
from fsam_ds.cli.predict import main as predict_main
from fsam_ds.trainer.run_config import config_to_dict, load_config


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A two-class export that reads one column, `text`."""
    root = tmp_path_factory.mktemp("classifier")
    model = fx.write_tiny_model(root / "bert")
    cfg = load_config(["--task=classification", f"--model={model}", "--data.train_file=train.csv",
                       "--data.dev_file=dev.csv", "--data.labels=no,yes", "--data.max_length=32"])
    return fx.as_export(model, root / "best", config_to_dict(cfg))


def predict(model_dir: Path, source: Path, output: Path, *extra: str) -> list[dict]:
    assert predict_main([str(model_dir), str(source), "--output", str(output), "--no-progress", *extra]) == 0
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def error_line(stderr: str) -> str:
    """The one `fsam-predict: error:` paragraph of a run's stderr (datasets' progress lines aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("fsam-predict: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def one_column_csv(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return path


def test_an_empty_text_in_a_one_column_csv_gets_its_own_prediction(classifier, tmp_path, capsys):
    texts = ["the film was good", "", "the plot was dull"]
    source = one_column_csv(tmp_path / "in.csv", texts)
    assert '""' in source.read_text()  # as csv writers write a row whose only field is empty
    with pytest.warns(UserWarning, match=r"column 'text' is empty .* in 1 of 3 row\(s\) \(row 2,"):
        rows = predict(classifier, source, tmp_path / "out.jsonl")
    assert "wrote 3 predictions" in capsys.readouterr().err
    assert [r["text"] for r in rows] == texts  # one line per row, in file order
    assert all(r["prediction"]["label"] in ("no", "yes") for r in rows)

    # trailing blank lines end the file; they are not rows
    source.write_text(source.read_text() + "\n\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="column 'text' is empty"):
        assert [r["text"] for r in predict(classifier, source, tmp_path / "out.jsonl")] == texts


def test_a_blank_line_inside_the_data_is_an_error_naming_the_file_and_line(classifier, tmp_path, capsys):
    source = tmp_path / "gaps.csv"
    source.write_text("text\nthe film was good\n\nthe plot was dull\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert predict_main([str(classifier), str(source), "--output", str(output), "--no-progress"]) == 2
    message = error_line(capsys.readouterr().err)
    assert str(source) in message and "row(s) 2 (counted after the header)" in message and '""' in message
    assert not output.exists()


# ------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def causal_export(tmp_path_factory) -> Path:
    """A causal-LM export whose EOS embedding (tied to its output row) is scaled up, so that greedy
    generation ends at once after some prompts and never after others: both marks occur."""
    root = tmp_path_factory.mktemp("causal")
    files = gf.write_generation_files(root / "data", n_train=4, n_dev=4)
    folder = gf.write_tiny_llama(root / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        model.get_output_embeddings().weight[eos] *= 8
    model.save_pretrained(folder)
    cfg = gf.generation_config(folder, files, "causal-lm", "pc")
    return fx.as_export(folder, root / "best", config_to_dict(cfg))


def reference(folder: Path, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """Greedy generation of the plain transformers model on the prompt alone, and whether it was cut at
    `max_new_tokens` (no EOS among them)."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = tok.eos_token_id not in out
    return tok.decode(out if cut else out[:out.index(tok.eos_token_id)], skip_special_tokens=True).strip(), cut


def test_max_new_tokens_caps_each_generation_and_marks_those_cut_at_the_limit(causal_export, tmp_path):
    prompts = [p for p, _ in gf.pairs(8, 5)] + [""]  # an empty prompt is generated from BOS
    source = gf.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    for limit in (3, 9):
        with pytest.warns(UserWarning, match=r"column 'prompt' is empty .* \(row 9,"):
            rows = predict(causal_export, source, tmp_path / "out.jsonl", "--max_new_tokens", str(limit))
        assert [r["prompt"] for r in rows] == prompts
        expected = [reference(causal_export, p, limit) for p in prompts]
        assert [(r["prediction"]["generated"], r["prediction"]["truncated"]) for r in rows] == expected
        assert all(len(r["prediction"]["generated"].split()) <= limit for r in rows)
        assert {cut for _, cut in expected} == {True, False}  # both marks are checked


def test_max_new_tokens_is_refused_for_a_classifier_and_below_one(classifier, causal_export, tmp_path, capsys):
    source = one_column_csv(tmp_path / "in.csv", ["the film was good"])
    assert predict_main([str(classifier), str(source), "--max_new_tokens", "8"]) == 2
    message = error_line(capsys.readouterr().err)
    assert "--max_new_tokens" in message and "'classification'" in message and "causal-lm" in message
    assert predict_main([str(causal_export), str(source), "--max_new_tokens", "0"]) == 2
    assert "--max_new_tokens = 0 must be >= 1" in error_line(capsys.readouterr().err)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        predict_main(["--version"])
    assert done.value.code == 0
    # the installed distribution's version, which is the package's own
    printed = capsys.readouterr().out.strip()
    assert printed == f"fsam-predict {version('fsam-ds')}" == f"fsam-predict {fsam_ds.__version__}"
