"""Sizing the generation demo on this machine: what SmolLM2-135M costs per step and per generated batch.

    python -m benchmarks.generation_sizing --json sizing.json

Measures, with plain PyTorch (no trainer, no DeepSpeed), on the real converted SmolLM2-135M-Instruct:
loading it from the cache folder (whole and cut to 2 layers, as tests load it), one AdamW step
(forward + backward + update) per micro-batch shape, greedy generation of the dev completions for a
batch, and the untrained model's exact match and chrF on dev examples of the spelling-correction
data (the room the demo has to improve), next to the chrF of copying the misspelled input unchanged.
Times are the least over `--repeats`, as wall and as process CPU seconds per thread (other processes
on the machine inflate the wall time; the load average is printed with them). Needs `sacrebleu` for chrF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.measure import median, table, write_json
from fsam_ds.cli.generation_assets import smollm2_path, spelling_correction_splits


def _timed(fn, repeats: int) -> tuple[dict[str, float], object]:
    """The least wall and process CPU seconds of `fn()` over `repeats` (the least disturbed run). On a
    shared machine the wall time grows with other people's load; CPU seconds / threads estimates the
    wall time the same work takes on idle cores."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall": min(walls), "cpu": min(cpus)}, out


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _token_lengths(tokenizer, records: list[dict]) -> dict[str, float]:
    """Tokens per example: prompt and completion alone, and the chat-formatted sequence (train length)."""
    prompt = [len(tokenizer(r["prompt"])["input_ids"]) for r in records]
    completion = [len(tokenizer(r["completion"])["input_ids"]) for r in records]
    chat = [len(tokenizer(_chat(tokenizer, r["prompt"]) + r["completion"] + "<|im_end|>")["input_ids"])
            for r in records]
    return {"prompt_median": median(prompt), "completion_median": median(completion),
            "completion_max": max(completion), "chat_sequence_median": median(chat), "chat_sequence_max": max(chat)}


def _adamw_step_seconds(model, batch: int, seq: int, repeats: int) -> dict[str, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates AdamW's state; not timed
    seconds, _ = _timed(step, repeats)
    return seconds


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"  # a decoder-only model continues from the last position
    inputs = tokenizer([_chat(tokenizer, p) for p in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def run(args: argparse.Namespace) -> dict:
    from sacrebleu.metrics import CHRF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    result: dict = {"threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}
    folder = smollm2_path()
    _, dev_path = spelling_correction_splits(seed=0, n_train=args.n_train, n_dev=args.n_dev, max_words=args.max_words)
    dev = [json.loads(line) for line in open(dev_path, encoding="utf-8")]

    result["load_s"], model = _timed(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), 3)
    result["load_2_layers_s"], small = _timed(
        lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, num_hidden_layers=2), 3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["parameters_2_layers"] = sum(p.numel() for p in small.parameters())
    result["tokens"] = _token_lengths(tokenizer, dev)

    model.train()
    result["adamw_step_s"] = {f"{b}x{s}": _adamw_step_seconds(model, b, s, args.repeats) for b, s in args.shapes}
    small.train()
    result["adamw_step_2_layers_s"] = {f"{b}x{s}": _adamw_step_seconds(small, b, s, args.repeats)
                                       for b, s in args.shapes[:1]}
    del small

    # Zero-shot quality and generation cost come from the same greedy runs over the dev examples.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # the untrained weights again
    hypotheses, batch_seconds = [], []
    examples = dev[:args.zero_shot]
    for start in range(0, len(examples), args.gen_batch):
        chunk = examples[start:start + args.gen_batch]
        seconds, outputs = _timed(lambda: _generate(model, tokenizer, [r["prompt"] for r in chunk],
                                                    args.max_new_tokens), 1)
        hypotheses += outputs
        if len(chunk) == args.gen_batch:
            batch_seconds.append(seconds)
    references = [r["completion"] for r in examples]
    copies = [r["prompt"].split("\n", 1)[1] for r in examples]
    result["generate_batch_s"] = {key: min(s[key] for s in batch_seconds) for key in ("wall", "cpu")}
    result["generate_batch"], result["max_new_tokens"] = args.gen_batch, args.max_new_tokens
    result["zero_shot"] = {
        "examples": len(examples),
        "exact_match": sum(h == r for h, r in zip(hypotheses, references)) / len(examples),
        "chrf": CHRF().corpus_score(hypotheses, [references]).score,
        "copy_input_chrf": CHRF().corpus_score(copies, [references]).score,
        "samples": [{"prompt": e["prompt"], "output": h} for e, h in zip(examples[:3], hypotheses[:3])],
    }
    result["load_average_end"] = os.getloadavg()
    return result


def _seconds(t: dict[str, float], threads: int) -> str:
    return f"{t['wall']:.2f} s wall, {t['cpu'] / threads:.2f} s CPU/thread"


def format_report(result: dict) -> str:
    threads = result["threads"]
    rows = [[shape, _seconds(t, threads)] for shape, t in result["adamw_step_s"].items()]
    rows += [[f"{shape} (2 layers)", _seconds(t, threads)] for shape, t in result["adamw_step_2_layers_s"].items()]
    zero = result["zero_shot"]
    return "\n".join([
        f"SmolLM2-135M-Instruct, {result['parameters'] / 1e6:.1f} M parameters ({result['parameters_2_layers'] / 1e6:.1f} M "
        f"with 2 layers), {threads} threads, load average "
        f"{result['load_average_start'][0]:.1f} at start, {result['load_average_end'][0]:.1f} at end",
        f"load from the cache folder: {_seconds(result['load_s'], threads)}; with num_hidden_layers=2: "
        f"{_seconds(result['load_2_layers_s'], threads)}",
        f"tokens (dev): {result['tokens']}",
        table(["AdamW step, batch x seq", "least of the repeats"], rows),
        f"greedy generation of up to {result['max_new_tokens']} tokens, batch {result['generate_batch']}: "
        f"{_seconds(result['generate_batch_s'], threads)} per batch",
        f"zero-shot on {zero['examples']} dev examples: exact match {zero['exact_match']:.3f}, chrF {zero['chrf']:.1f} "
        f"(copying the misspelled input: chrF {zero['copy_input_chrf']:.1f})",
        *[f"  {s['prompt']!r} -> {s['output']!r}" for s in zero["samples"]],
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation_sizing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x64", "8x64", "16x64", "8x96"],
                        help="micro-batch shapes BATCHxSEQ for the AdamW step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n_train", type=int, default=1000)
    parser.add_argument("--n_dev", type=int, default=200)
    parser.add_argument("--max_words", type=int, default=20)
    parser.add_argument("--zero_shot", type=int, default=48, help="dev examples generated for zero-shot quality")
    parser.add_argument("--gen_batch", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    result = run(args)
    print(format_report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
