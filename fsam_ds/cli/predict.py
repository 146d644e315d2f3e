"""fsam-predict: apply a model that fsam-train exported (RUN/best or RUN/final) to a file.

    fsam-predict runs/my-run/best reviews.csv                          # writes reviews.predictions.jsonl
    fsam-predict runs/my-run/final test.jsonl --output preds.jsonl --batch_size 128 --device cuda
    fsam-predict runs/my-sft/best prompts.jsonl --max_new_tokens 256    # causal-lm / seq2seq
    fsam-predict runs/my-lora/final test.csv     # a LoRA adapter on its base; final/merged: merged into it

The task is rebuilt from the run's configuration saved in the export (run_config.json), so the file
is read, tokenized and its classes named exactly as in training: the same text columns, max_length
and label set. The input may be .csv/.tsv/.json/.jsonl/.parquet; its label (or target) column is not
needed.

The output is JSON lines, exactly one per input row, in file order, an empty text included: the row's
own columns plus "prediction", the task's prediction for it. Classification: {"label": ...,
"probabilities": {class: p}}; regression: {"score": ...}; causal-lm and seq2seq: {"generated": text,
"truncated": true|false}, greedy, at most --max_new_tokens tokens (default: the run's
eval.max_new_tokens), "truncated" true where the generation reached that limit without ending (EOS).
In a CSV file a row whose only text is empty is written "" (as csv writers do); a blank line within
the data is an error, as is any row that cannot be read, named by the file and row.

Batched, with a progress bar on stderr; exit status 2 and one paragraph for an input error (a folder
that is not an export, a missing column, a blank line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

PREDICTION = "prediction"


class PredictError(ValueError):
    """An input fsam-predict cannot use; the message says what to give instead."""


def _run_config(folder: Path) -> dict[str, Any]:
    """The exported run's configuration, with the settings that only training reads neutralised."""
    from fsam_ds.trainer.run_dir import MANIFEST, RUN_CONFIG_FILE, verify_folder
    from fsam_ds.trainer.peft_model import is_adapter_folder

    if not folder.is_dir():
        raise PredictError(f"{str(folder)!r} is not a folder. Give a model folder that fsam-train exported: "
                           "<output_dir>/best or <output_dir>/final of a finished run.")
    if not ((folder / "config.json").is_file() or is_adapter_folder(folder)) or not (folder / MANIFEST).is_file():
        hint = (" It holds best/ or final/: pass one of those." if any((folder / n).is_dir() for n in ("best", "final"))
                else "")
        raise PredictError(f"{str(folder)!r} is not a model exported by fsam-train (it lacks config.json or "
                           f"{MANIFEST}).{hint} Give <output_dir>/best or <output_dir>/final of a run.")
    verify_folder(folder)
    path = folder / RUN_CONFIG_FILE
    if not path.is_file():
        raise PredictError(f"{str(folder)!r} has no {RUN_CONFIG_FILE}, the run's configuration that says which task "
                           "the model was trained on and how its inputs were read; it was exported by an older "
                           "fsam-train. Export it again by training with this version, or copy the run's "
                           f"config.json (in its output_dir) into it as {RUN_CONFIG_FILE}.")
    config = json.loads(path.read_text(encoding="utf-8"))
    # the model is this folder; a DeepSpeed config file or checkpoint of the training machine is not needed
    config.update(model=str(folder), tokenizer=str(folder), ds_config=None, resume=False)
    return config


def predict_file(model_dir: str | os.PathLike, input_file: str | os.PathLike, output: str | os.PathLike, *,
                 batch_size: int | None = None, device: str | None = None, progress: bool = True,
                 max_new_tokens: int | None = None, base_model: str | None = None) -> int:
    """Writes one JSON line per row of `input_file` to `output`; returns the number of rows.
    `max_new_tokens` (causal-lm and seq2seq only): the longest generation, instead of the run's
    eval.max_new_tokens. `base_model` (a LoRA adapter export): the base to put the adapter on, instead
    of the one its adapter_config.json records."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from fsam_ds.trainer.data.readers import read_table, table_rows
    from fsam_ds.trainer.objectives import objective_for
    from fsam_ds.trainer.peft_model import load_exported
    from fsam_ds.trainer.run_config import config_from_dict
    from fsam_ds.trainer.tasks import GENERATION_TASKS

    folder, input_file, output = Path(model_dir), Path(input_file), Path(output)
    run_config = _run_config(folder)
    if max_new_tokens is not None:
        task = str(run_config.get("task", "")).strip().lower().replace("_", "-")
        if task not in GENERATION_TASKS:
            raise PredictError(f"--max_new_tokens = {max_new_tokens} limits a generation, but {str(folder)!r} was "
                               f"trained for task {run_config.get('task')!r}, which predicts a class or score; "
                               f"only {' and '.join(GENERATION_TASKS)} models generate. Drop --max_new_tokens.")
        run_config["eval"] = {**run_config.get("eval", {}), "max_new_tokens": max_new_tokens}
    cfg = config_from_dict(run_config)
    objective = objective_for(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # read once: the same rows are tokenized and echoed
    columns = read_table(input_file, encoding=cfg.data.encoding)
    inputs = objective.prediction_inputs(input_file, columns, tokenizer)
    rows = table_rows(columns)
    if len(rows) != len(inputs):
        raise PredictError(f"{str(input_file)!r} has {len(rows)} rows but task {cfg.task!r} made {len(inputs)} "
                           "examples of them, so predictions could not be matched to rows. Remove malformed "
                           "rows from the file.")
    if rows and PREDICTION in rows[0]:
        raise PredictError(f"{str(input_file)!r} has a column {PREDICTION!r}, the name fsam-predict writes each "
                           "row's prediction under. Rename that column.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_exported(folder, objective, base_model).to(device).eval()
    loader = DataLoader(inputs, batch_size=batch_size or cfg.data.eval_batch_size, shuffle=False,
                        collate_fn=objective.collator(tokenizer))
    tmp = output.with_name(output.name + ".tmp")
    done = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for batch in tqdm(loader, desc="predicting", unit="batch", file=sys.stderr, disable=not progress):
                for prediction in objective.predict(model, batch):
                    # default=str: a parquet date or decimal column is echoed as text
                    out.write(json.dumps({**rows[done], PREDICTION: prediction}, ensure_ascii=False,
                                         default=str) + "\n")
                    done += 1
        os.replace(tmp, output)  # a cut-short run leaves no partial predictions file under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return done


def _parser() -> argparse.ArgumentParser:
    from fsam_ds.trainer.run_config import package_version

    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="fsam-predict", description="\n\n".join(paragraphs[:2]),
                                     epilog="\n\n".join(paragraphs[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="an exported model folder: <output_dir>/best or <output_dir>/final")
    parser.add_argument("input", help="the file to predict on (.csv/.tsv/.json/.jsonl/.parquet)")
    parser.add_argument("--output", help="the JSON lines file to write (default: <input>.predictions.jsonl "
                                         "next to the input)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="examples per forward pass (default: the run's data.eval_batch_size)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="causal-lm / seq2seq: the longest generation, in tokens (default: the run's "
                             "eval.max_new_tokens); a generation cut there is marked \"truncated\": true")
    parser.add_argument("--base_model", default=None,
                        help="a LoRA adapter export: the base model folder or hub id (default: the one its "
                             "adapter_config.json records)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs fsam-predict; returns the exit status (0, or 2 for an input error, reported as one paragraph)."""
    from fsam_ds.trainer.loop import KNOWN_ERRORS

    args = _parser().parse_args(argv)
    for flag in ("batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"fsam-predict: error: --{flag} = {value} must be >= 1.", file=sys.stderr)
            return 2
    source = Path(args.input)
    output = Path(args.output) if args.output else source.with_name(source.stem + ".predictions.jsonl")
    try:
        n = predict_file(args.model_dir, source, output, batch_size=args.batch_size, device=args.device,
                         progress=args.progress, max_new_tokens=args.max_new_tokens, base_model=args.base_model)
    except (PredictError, *KNOWN_ERRORS) as err:
        print(f"fsam-predict: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {n} predictions to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
