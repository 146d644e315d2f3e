"""Rank-0 run logging, and the one reader and writer of metrics.jsonl.

`RunLogger` writes metrics.jsonl, Weights & Biases, the progress bar and console lines.
`read_events`, `read_summary` and `trim_metrics` are how everything else (fsam-report, the sweep
runner, the demo, resuming) reads metrics.jsonl back.

metrics.jsonl holds one JSON object per line, flushed as it is written:

    {"event": "start" | "train" | "eval" | "mask" | "summary", "step": N, ..., "time": unix seconds}

JSON has no NaN or infinity, so a non-finite float is written as the string "nan", "inf" or "-inf",
and `read_events` turns exactly these three strings back into floats; `null` is None (the
best_metric of a run that never evaluated). Tensors and numpy scalars are written as numbers. A run
killed mid-write may leave its last line cut short: readers skip that line with a warning. Any
other line that is not a JSON object is an error that names the file and line.

Named metrics_log (not logging) so that running a module from inside the package folder can
never shadow the standard library's `logging`, which wandb and transformers import.
"""

from __future__ import annotations

import datetime
import json
import math
import netrc
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from tqdm import tqdm

from fsam_ds.sam.config import is_number
from fsam_ds.trainer.run_config import TrainConfig
from fsam_ds.zero.files import decode_nonfinite, encode_nonfinite, plain_values, replace_file

__all__ = ["RunLogger", "NullLogger", "open_run_logger", "resolve_wandb_mode", "wandb_api_key_configured",
           "MetricsFileError", "METRICS_FILE", "encode_event", "read_events",
           "read_summary", "trim_metrics"]

METRICS_FILE = "metrics.jsonl"
WandbMode = Literal["online", "offline", "disabled"]
DEFAULT_INIT_TIMEOUT_S = 15.0
DEFAULT_FINISH_TIMEOUT_S = 120.0


def wandb_api_key_configured() -> bool:
    """Whether wandb has credentials, judged from the environment and netrc only (no network)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(mode: WandbMode | Literal["auto"]) -> WandbMode:
    """`auto` -> online with credentials, else offline; an explicit WANDB_MODE/WANDB_DISABLED wins over auto."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env_mode = os.environ.get("WANDB_MODE", "").lower().replace("dryrun", "offline")  # dryrun: wandb's old offline
    if env_mode in ("offline", "disabled", "online"):
        return env_mode  # type: ignore[return-value]
    return "online" if wandb_api_key_configured() else "offline"


def _format_duration(seconds: float) -> str:
    """H:MM:SS, or '?' for a negative or non-finite estimate."""
    return str(datetime.timedelta(seconds=int(seconds))) if math.isfinite(seconds) and seconds >= 0 else "?"


# ---------------------------------------------------------------------------- metrics.jsonl lines

class MetricsFileError(ValueError):
    """A metrics.jsonl line, other than a cut-short last one, that is not a JSON object."""


def encode_event(record: dict[str, Any]) -> str:
    """One metrics.jsonl line (without the newline) for a record of Python values."""
    # allow_nan=False: a non-finite float that escaped the encoding would be invalid JSON; fail loudly
    return json.dumps(encode_nonfinite(record), allow_nan=False, default=str)


def read_events(path: str | os.PathLike, event: str | None = None) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl in file order (only those of kind `event` if given).

    A cut-short last line (a killed run) is skipped with a warning; any other bad line raises
    MetricsFileError naming the file and line.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record, problem = None, f"not valid JSON ({err})"
        else:
            problem = f"a JSON {type(record).__name__}, not an object"
        if not isinstance(record, dict):
            where = f"{path}:{index + 1}"
            if index == last:
                warnings.warn(f"{where}: skipping the last line, which is {problem}: a run killed "
                              "mid-write leaves it cut short.", stacklevel=2)
                continue
            raise MetricsFileError(
                f"{where} is {problem}; every line of {METRICS_FILE} is one JSON object as RunLogger writes "
                f"it. Delete or repair line {index + 1} (only the last line of a killed run may be cut short).")
        if event is None or record.get("event") == event:
            records.append(decode_nonfinite(record))
    return records


def read_summary(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last "summary" record of a metrics.jsonl: None if the run has none yet or the file is missing."""
    if not Path(path).is_file():
        return None
    summaries = read_events(path, "summary")
    return summaries[-1] if summaries else None


def trim_metrics(path: str | os.PathLike, step: int, keep_eval: bool = True) -> None:
    """Drops the events a killed run logged after the checkpoint it is resumed from (and its summary),
    and with keep_eval=False the evaluation of that step itself (the checkpoint was written before it, and
    the resumed run runs it again), so that metrics.jsonl reads as one uninterrupted run; rank 0 only,
    before the logger opens it."""
    path = Path(path)
    if not path.is_file():
        return

    def after(record: dict[str, Any]) -> bool:
        at = record.get("step")
        if not isinstance(at, int):
            return False
        return at > step or (not keep_eval and at == step and record.get("event") == "eval")

    kept = [r for r in read_events(path) if r.get("event") != "summary" and not after(r)]
    replace_file(path, "".join(encode_event(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------- the writer


class RunLogger:
    """Writes every event to `<output_dir>/metrics.jsonl` (and wandb when enabled); rank 0 only.

    Use `open_run_logger`, which hands other ranks a `NullLogger` with the same methods.
    """

    def __init__(self, cfg: TrainConfig, config: dict[str, Any], total_steps: int | None = None, start_step: int = 0,
                 resumed: bool | None = None) -> None:
        """`config`: the run's configuration as `config_to_dict` gives it, for wandb."""
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resumed = bool(cfg.resume) if resumed is None else resumed
        self.total_steps = total_steps
        # Line buffering flushes each event as it is written, so a crash loses nothing logged.
        self._file = open(self.output_dir / METRICS_FILE, "a" if self.resumed else "w", encoding="utf-8", buffering=1)
        self.config = config
        self._start_time = time.time()
        self._window_start = time.perf_counter()
        self._window_losses: list[float] = []
        self._window_examples = 0
        self._step = self._start_step = start_step
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not cfg.log.progress, file=sys.stderr, mininterval=1.0)
        self.wandb_mode: WandbMode = "disabled"
        self._run: Any = None
        self._init_wandb(resolve_wandb_mode(cfg.log.wandb))
        self.log("start", step=start_step, resumed=self.resumed, total_steps=total_steps,
                 wandb_mode=self.wandb_mode)

    # ---- wandb

    def _init_wandb(self, mode: WandbMode) -> None:
        if mode == "disabled":
            return  # wandb is not even imported: nothing of it touches the disk
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed; logging to metrics.jsonl only.", stacklevel=3)
            return
        if mode == "online" and not wandb_api_key_configured():
            # Without a key wandb.init would ask for one on the terminal and wait for an answer.
            warnings.warn("log.wandb is online but no wandb API key is configured (WANDB_API_KEY or "
                          "`wandb login`); logging offline instead (upload later with `wandb sync`).",
                          stacklevel=3)
            mode = "offline"
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S))
        # Continue the same wandb run on resume so the curves stay in one place.
        id_file = self.output_dir / "wandb-run-id"
        same_run: dict[str, Any] = {}
        if self.resumed and id_file.is_file():
            same_run = {"id": id_file.read_text(encoding="utf-8").strip(), "resume": "allow"}
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                settings = wandb.Settings(init_timeout=timeout, finish_timeout=DEFAULT_FINISH_TIMEOUT_S,
                                          console="off", silent=True, reinit="create_new")
                self._run = wandb.init(
                    project=self.cfg.log.wandb_project, name=self.output_dir.name, dir=str(self.output_dir),
                    config=self.config, mode=attempt, settings=settings, **same_run)
            except Exception as err:  # training must not die because of wandb
                warnings.warn(f"wandb.init(mode={attempt!r}) failed ({type(err).__name__}: {err}); "
                              + ("falling back to offline." if attempt != "offline" else
                                 "logging to metrics.jsonl only."), stacklevel=3)
                continue
            self.wandb_mode = attempt
            self._run.define_metric("step")
            self._run.define_metric("*", step_metric="step")
            id_file.write_text(self._run.id + "\n", encoding="utf-8")
            return

    def _wandb_log(self, event: str, record: dict[str, Any]) -> None:
        # "start" is bookkeeping for the report; "summary" goes to the run summary, not the history.
        if self._run is None or event in ("start", "summary"):
            return
        payload: dict[str, Any] = {}  # "step" as it is, numbers as "<event>/<key>", dicts as "<event>/<key>/<k>"
        for key, value in record.items():
            if isinstance(value, dict):
                payload.update({f"{event}/{key}/{k}": v for k, v in value.items()})
            elif is_number(value) and key != "time":
                payload["step" if key == "step" else f"{event}/{key}"] = value
        try:
            self._run.log(payload)
        except Exception as err:
            warnings.warn(f"wandb log failed ({err}); continuing with metrics.jsonl only.", stacklevel=3)
            self._run = None

    # ---- events

    def log(self, event: str, step: int | None = None, **fields: Any) -> dict[str, Any]:
        """Write one event line immediately (and to wandb); returns the record written."""
        step_field = {} if step is None else {"step": step}
        record = plain_values({"event": event, **step_field, **fields, "time": round(time.time(), 3)})
        if not self._file.closed:
            self._file.write(encode_event(record) + "\n")
        self._wandb_log(event, record)
        return record

    def train_step(self, step: int, loss: float, examples: int, **scalars: Any) -> dict[str, Any] | None:
        """Call once per optimizer step; every `log_every` steps writes the window's mean loss.

        `examples` is the number of training examples this step consumed on all ranks together.
        `scalars` (lr, rho, grad_norm, ...) are logged with their latest value.
        """
        loss = float(loss)  # a one-element tensor too
        self._window_losses.append(loss)
        self._window_examples += examples
        self._step = step
        elapsed = time.perf_counter() - self._window_start
        throughput = self._window_examples / elapsed if elapsed > 0 else float("nan")
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{throughput:.1f}", refresh=False)
        if step % self.cfg.log.log_every != 0:
            return None
        mean_loss = sum(self._window_losses) / len(self._window_losses)
        record = self.log("train", step=step, loss=mean_loss, examples_per_s=throughput, **scalars)
        self._console_line(step, mean_loss, throughput, scalars)
        self._window_losses, self._window_examples = [], 0
        self._window_start = time.perf_counter()
        return record

    def _console_line(self, step: int, loss: float, throughput: float, scalars: dict[str, Any]) -> None:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}", f"loss {loss:.4f}"]
        parts += [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items()]
        parts.append(f"{throughput:.1f} ex/s")
        elapsed = time.time() - self._start_time
        parts.append(f"elapsed {_format_duration(elapsed)}")
        done = step - self._start_step
        if self.total_steps and done > 0:
            parts.append(f"eta {_format_duration((self.total_steps - step) * elapsed / done)}")
        self.console(" | ".join(parts))

    def console(self, message: str) -> None:
        """A human-readable line that does not break the progress bar."""
        tqdm.write(message, file=sys.stdout)

    def log_eval(self, step: int, metrics: dict[str, Any], metric_name: str | None = None,
                 epoch: int | float | None = None) -> dict[str, Any]:
        """One dev evaluation; `metric_name` marks which key is the model-selection metric."""
        labels = {k: v for k, v in (("epoch", epoch), ("metric_name", metric_name)) if v is not None}
        record = self.log("eval", step=step, **labels, **metrics)
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.console(f"eval @ step {step}: {shown}")
        return record

    def log_mask(self, step: int, density: dict[str, float]) -> dict[str, Any]:
        """Per-tensor fraction of entries the Fisher mask keeps (read by fsam-report)."""
        return self.log("mask", step=step, density={k: float(v) for k, v in density.items()})

    def summary(self, best_metric: float | None, metric_name: str, **extra: Any) -> dict[str, Any]:
        """The run's final line: best dev metric and anything else worth a glance."""
        record = self.log("summary", step=self._step, best_metric=best_metric, metric_name=metric_name,
                          elapsed_s=round(time.time() - self._start_time, 1), **extra)
        if self._run is not None:
            try:
                self._run.summary.update({k: v for k, v in record.items() if k not in ("event", "time")})
            except Exception as err:
                warnings.warn(f"wandb summary failed ({err}).", stacklevel=2)
        return record

    def close(self) -> None:
        self._bar.close()
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as err:
                warnings.warn(f"wandb finish failed ({err}); the offline files stay in {self.output_dir}.",
                              stacklevel=2)
            self._run = None
        self._file.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger:
    """What ranks other than 0 get: the RunLogger interface, doing nothing."""

    wandb_mode: WandbMode = "disabled"

    def _do_nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    log = train_step = console = log_eval = log_mask = summary = close = __exit__ = _do_nothing

    def __enter__(self) -> NullLogger:
        return self


def open_run_logger(cfg: TrainConfig, config: dict[str, Any], rank: int | None = None, total_steps: int | None = None,
                    start_step: int = 0, resumed: bool | None = None) -> RunLogger | NullLogger:
    """A RunLogger on rank 0, a NullLogger elsewhere (`rank` defaults to $RANK, else 0); `config` is the run's
    configuration as `config_to_dict` gives it."""
    if (int(os.environ.get("RANK", "0")) if rank is None else rank) != 0:
        return NullLogger()
    return RunLogger(cfg, config, total_steps=total_steps, start_step=start_step, resumed=resumed)
