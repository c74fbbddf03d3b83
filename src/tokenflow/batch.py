"""``tokenflow batch``: many edits (videos x prompts) on Ray workers that each load the model once.

A JOBS file (YAML, JSONL or CSV) holds ``defaults`` (any ``edit`` option, :class:`~tokenflow.runner.RunOptions`
field names) and ``jobs`` (a ``video`` plus ``prompt`` or ``prompts`` and options of its own). It is validated as a
whole before Ray starts: every bad row is named by its line number in one :class:`~tokenflow.errors.InputError`.

Each job (one video, all its prompts) goes to one worker, a Ray actor that keeps its
:class:`~tokenflow.editor.TokenFlowEditor` between jobs; the prompts run one after another through
:func:`tokenflow.runner.edit_video`, so the first inverts the video and the others hit the inversion cache. There is
no algorithm here: scheduling, retries, skipping and the summary only.

Outputs: ``OUT/<job>/<prompt>/`` (an ``edit`` run folder plus ``batch.json``, the settings hash that makes a re-run
skip it) and ``OUT/summary.json``. A job whose worker process dies is resubmitted to a fresh worker (``retries``
times); a job that fails on its input is reported and the others go on.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import InputError, TokenFlowError
from .library_logs import quiet_model_libraries

logger = logging.getLogger(__name__)

__all__ = ["BatchResult", "Job", "Unit", "load_jobs", "run_batch"]

MARKER = "batch.json"  # in each finished prompt folder: the settings hash a re-run compares
SUMMARY = "summary.json"
STAGES = ("inversion", "reconstruction", "editing", "decoding")  # edit_video's progress stages, in order
JOB_FIELDS = ("video", "prompt", "prompts", "name")
NOT_IN_FILE = {"out": "set by --out for the whole batch", "config": "not used by tokenflow batch"}
HASH_IGNORES = ("out", "quiet", "cache_dir")  # where things go and how loud, not what is computed
PATH_OPTIONS = ("model", "keyframes", "controlnet", "control", "depth_model")  # looked up beside the JOBS file
MAX_PROBLEMS = 12


# ----------------------------------------------------------------------------- the JOBS file


@dataclass
class Unit:
    """One prompt of one job: one ``edit_video`` call and one output folder."""

    prompt: str
    out: Path
    options: dict  # RunOptions keyword arguments, without out/quiet
    settings_hash: str
    status: str = "pending"  # pending, running, done, skipped, failed, cancelled
    seconds: float | None = None
    timings: dict = field(default_factory=dict)
    cache_hit: bool | None = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    worker: dict | None = None
    fraction: float = 0.0  # progress of a running unit, 0..1


@dataclass
class Job:
    """One row of the JOBS file: a video and its prompts, run on one worker."""

    index: int
    line: int
    name: str
    video: str
    units: list[Unit]
    attempts: int = 0
    model_key: tuple = ()


@dataclass
class _Row:
    line: int
    values: object
    key_lines: dict = field(default_factory=dict)


def _split_union(text: str) -> list[str]:
    """``"str | list[str] | None"`` -> its top-level alternatives (``|`` inside brackets kept)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [p for p in (*parts, current.strip()) if p]


def _annotation_kinds(annotation) -> tuple[set, bool]:
    """A field's annotation (a string under ``from __future__ import annotations``, else a type) as the kinds a
    JOBS value may take: str, int, float, bool, list (of text), seq (any list), any (checked by RunOptions)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    kinds, optional = set(), False
    for part in _split_union(text.replace("typing.", "")):
        if part.startswith("Optional[") and part.endswith("]"):
            inner, _ = _annotation_kinds(part[len("Optional["):-1])
            kinds |= inner
            optional = True
            continue
        base = part.split("[", 1)[0].rsplit(".", 1)[-1]
        if base in ("None", "NoneType"):
            optional = True
        elif base in ("str", "Path", "PathLike"):
            kinds.add("str")
        elif base in ("int", "float", "bool"):
            kinds.add(base)
        elif base in ("list", "List"):
            kinds.add("list" if part.replace(" ", "") in ("list[str]", "List[str]") else "seq")
        elif base in ("Sequence", "tuple", "Tuple"):
            kinds.add("seq")
        else:
            kinds.add("any")
    return kinds or {"any"}, optional


def _option_types() -> dict:
    """RunOptions field -> (kinds, optional)."""
    from .runner import RunOptions

    return {f.name: _annotation_kinds(f.type) for f in fields(RunOptions)}


_KIND_WORDS = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
               "list": "a list of text", "seq": "a list", "any": "a value"}


def _coerce(name: str, value, kinds: set, optional: bool, text: bool):
    """``value`` as the option's type, or raise ValueError with the reason. ``text``: a CSV cell (parse it)."""
    expected = " or ".join(_KIND_WORDS[k] for k in sorted(kinds))
    if "any" in kinds and value is not None:  # a type of its own (a schedule, a selection): RunOptions checks it
        return value.strip() if text else value
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} needs a value ({expected})")
    if text:
        value = value.strip()
        if optional and value.lower() in ("none", "null"):
            return None
        if "bool" in kinds:
            low = value.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        for kind, parse in (("int", int), ("float", float)):
            if kind in kinds:
                try:
                    return parse(value)
                except ValueError:
                    pass
        if "list" in kinds:
            return [part.strip() for part in value.split("|") if part.strip()]
        if "str" in kinds:
            return value
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
    elif isinstance(value, (int, float)):
        if isinstance(value, int) and "int" in kinds:
            return value
        if "float" in kinds:
            return float(value)
        if "str" in kinds:
            return str(value)
    elif isinstance(value, str):
        if "str" in kinds:
            return value
        if "list" in kinds:
            return [value]
    elif isinstance(value, list):
        if "list" in kinds and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return [str(v) for v in value]
        if "seq" in kinds:
            return value
    raise ValueError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _yaml_rows(path: Path, text: str) -> tuple[_Row | None, list[_Row]]:
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InputError(f"{path}: {where}cannot be parsed ({problem}); fix the YAML syntax") from exc
    finally:
        loader.dispose()

    def key_lines(mapping) -> dict:
        if not isinstance(mapping, yaml.MappingNode):
            return {}
        return {str(k.value).replace("-", "_"): k.start_mark.line + 1 for k, _ in mapping.value}

    def child(mapping, name):
        if isinstance(mapping, yaml.MappingNode):
            for k, v in mapping.value:
                if k.value == name:
                    return v
        return None

    if data is None:
        raise InputError(f"{path}: no jobs; write a `jobs:` list of {{video, prompt}} entries")
    if isinstance(data, list):  # a bare list of jobs
        jobs_data, jobs_node, defaults = data, node, None
    elif isinstance(data, dict):
        unknown = sorted(set(map(str, data)) - {"defaults", "jobs"})
        if unknown:
            line = key_lines(node).get(unknown[0].replace("-", "_"), 1)
            raise InputError(f"{path}: line {line}: unknown top-level key {unknown[0]!r}; use `defaults:` and `jobs:`")
        jobs_data, jobs_node = data.get("jobs"), child(node, "jobs")
        defaults = None
        if data.get("defaults") is not None:
            dnode = child(node, "defaults")
            defaults = _Row(dnode.start_mark.line + 1, data["defaults"], key_lines(dnode))
    else:
        raise InputError(f"{path}: expected a mapping with `defaults:` and `jobs:`")
    if not isinstance(jobs_data, list) or not jobs_data:
        line = jobs_node.start_mark.line + 1 if jobs_node is not None else 1
        raise InputError(f"{path}: line {line}: `jobs:` must be a non-empty list of {{video, prompt}} entries")
    rows = []
    for item, item_node in zip(jobs_data, jobs_node.value, strict=True):
        rows.append(_Row(item_node.start_mark.line + 1, item, key_lines(item_node)))
    return defaults, rows


def _jsonl_rows(path: Path, text: str) -> tuple[_Row | None, list[_Row]]:
    defaults, rows = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not JSON ({exc.msg}); one job object per line") from exc
        if isinstance(value, dict) and set(value) == {"defaults"}:
            if defaults is not None:
                raise InputError(f"{path}: line {number}: a second defaults line; keep one")
            defaults = _Row(number, value["defaults"])
        else:
            rows.append(_Row(number, value))
    if not rows:
        raise InputError(f"{path}: no jobs; write one {{\"video\": ..., \"prompt\": ...}} object per line")
    return defaults, rows


def _csv_rows(path: Path, text: str) -> tuple[_Row | None, list[_Row]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for record in reader:
        if None in record:
            raise InputError(f"{path}: line {reader.line_num}: more cells than header columns")
        values = {k.strip(): v for k, v in record.items() if k is not None and v is not None and v.strip() != ""}
        if values:
            rows.append(_Row(reader.line_num, values))
    if not rows:
        raise InputError(f"{path}: no jobs; a header line (video,prompt,...) and one row per job")
    return None, rows


def _resolve(value: str, base: Path, must_exist: bool) -> str:
    """A relative path beside the JOBS file, else in the current folder; unchanged when neither exists (a hub
    id) unless ``must_exist`` (the video: then beside the JOBS file, to fail with that path)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    for candidate in (base / path, Path.cwd() / path):
        if candidate.exists():
            return str(candidate.resolve())
    return str((base / path).resolve()) if must_exist else value


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:limit].strip("-._")


def prompt_folder(prompt: str) -> str:
    """The folder of one prompt's output: readable, and unique through a hash of the whole prompt."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:6]
    slug = _slug(prompt)
    return f"{slug}-{digest}" if slug else f"prompt-{digest}"


def _video_signature(video: str):
    """Size and modification time of the video (or of a folder's files): a changed input is edited again."""
    path = Path(video)
    try:
        if path.is_dir():
            return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return None


def settings_hash(options: dict) -> str:
    """What a prompt's output depends on: every option but where it goes, plus the video file's identity."""
    from . import __version__

    params = {k: v for k, v in options.items() if k not in HASH_IGNORES}
    params["video_signature"] = _video_signature(str(options["video"]))
    params["tokenflow"] = __version__
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_key(options: dict) -> tuple:
    """What a worker's loaded model depends on (jobs sharing it run on a warm worker first)."""
    return (str(options.get("model")), tuple(options.get("lora") or ()),
            options.get("controlnet") if options.get("mode") == "controlnet" else None,
            options.get("offload"), options.get("device", "auto"), options.get("dtype", "auto"))


def load_jobs(
    path: str | Path, out: str | Path, cache_dir: str | Path | None = None, remote: bool = False
) -> list[Job]:
    """Read and validate a JOBS file; every problem (with its line number) in one :class:`InputError`.

    ``out``: the batch's output folder (one folder per job and prompt below it); ``cache_dir``: overrides any
    ``cache_dir`` of the file. ``remote``: the jobs run on a cluster, so this machine's devices are not checked.
    """
    from .runner import RunOptions

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such JOBS file; check the path")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from exc
    suffix = path.suffix.lower()
    reader = _csv_rows if suffix == ".csv" else _jsonl_rows if suffix in (".jsonl", ".ndjson") else _yaml_rows
    defaults_row, rows = reader(path, text)
    text_cells = suffix == ".csv"
    option_types = _option_types()
    base = path.resolve().parent
    problems: list[str] = []

    def check_mapping(row: _Row, allowed: set, what: str) -> dict | None:
        if not isinstance(row.values, dict):
            problems.append(f"line {row.line}: {what} must be a mapping of option names to values, "
                            f"got {type(row.values).__name__}")
            return None
        values, ok = {}, True
        for key, value in row.values.items():
            name = str(key).replace("-", "_")
            line = row.key_lines.get(name, row.line)
            if name in NOT_IN_FILE or (name in JOB_FIELDS and name not in allowed):
                reason = NOT_IN_FILE.get(name) or f"belongs in each job, not in {what}"
                problems.append(f"line {line}: {name!r} {reason}")
                ok = False
                continue
            if name not in allowed:
                close = difflib.get_close_matches(name, sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"line {line}: unknown option {name!r}{hint}")
                ok = False
                continue
            try:
                if name in ("video", "name"):
                    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
                        raise ValueError(f"{name} must be text (a path)" if name == "video" else f"{name} must be text")
                    value = str(value).strip()
                elif name == "prompts":
                    if text_cells:
                        value = [p.strip() for p in value.split("|") if p.strip()]
                    if not (isinstance(value, list) and value
                            and all(isinstance(p, str) and p.strip() for p in value)):
                        raise ValueError("prompts must be a non-empty list of text prompts")
                elif name in option_types:
                    value = _coerce(name, value, *option_types[name], text=text_cells)
            except ValueError as exc:
                problems.append(f"line {line}: {exc}")
                ok = False
                continue
            values[name] = value
        return values if ok else None

    option_names = {f.name for f in fields(RunOptions)} - set(NOT_IN_FILE) - {"video"}
    defaults: dict = {}
    if defaults_row is not None:
        defaults = check_mapping(defaults_row, option_names, "defaults") or {}

    jobs: list[Job] = []
    names: dict[str, int] = {}
    for index, row in enumerate(rows):
        values = check_mapping(row, option_names | set(JOB_FIELDS), "a job")
        if values is None:
            continue
        if "video" not in values:
            problems.append(f"line {row.line}: missing video")
            continue
        if "prompt" in values and "prompts" in values:
            problems.append(f"line {row.line}: give prompt or prompts, not both")
            continue
        prompts = values.pop("prompts", None) or [values.pop("prompt", None) or defaults.get("prompt", "")]
        values.pop("prompt", None)
        prompts = [str(p) for p in prompts]
        if not any(p.strip() for p in prompts):
            problems.append(f"line {row.line}: missing prompt (give prompt: TEXT or prompts: [TEXT, ...])")
            continue
        if len(set(prompts)) != len(prompts):
            problems.append(f"line {row.line}: a prompt is listed twice")
            continue
        explicit = values.pop("name", None)
        name = _slug(explicit or Path(values["video"]).stem, 60) or f"job{index + 1}"
        if explicit is not None and name in names:
            problems.append(f"line {row.line}: job name {name!r} is used twice (first on line {names[name]})")
            continue
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}-{n}", n + 1
        names[unique] = row.line
        merged = {**defaults, **values}
        merged["video"] = _resolve(merged["video"], base, must_exist=True)
        for key in PATH_OPTIONS:
            if isinstance(merged.get(key), str) and merged[key] not in ("random", "fixed", "canny", "depth"):
                merged[key] = _resolve(merged[key], base, must_exist=False)
        if cache_dir is not None:
            merged["cache_dir"] = str(Path(cache_dir).expanduser().resolve())
        elif merged.get("cache_dir") is not None:
            merged["cache_dir"] = _resolve(str(merged["cache_dir"]), base, must_exist=True)
        units, bad = [], False
        for prompt in prompts:
            options = {**merged, "prompt": prompt}
            options.pop("quiet", None)
            try:
                probe = RunOptions(**options, quiet=True)
                if remote and str(probe.device) != "auto" and str(probe.device) != "cpu":
                    probe = replace(probe, device="cpu")  # a cluster's devices are not this machine's
                probe.check_inputs()
            except TokenFlowError as exc:
                problems.append(f"line {row.line}: {' '.join(str(exc).split())}")
                bad = True
                break
            except (TypeError, ValueError) as exc:
                problems.append(f"line {row.line}: {exc}")
                bad = True
                break
            options = json.loads(json.dumps(options, default=str))  # plain values, as they travel to workers
            folder = Path(out) / unique / prompt_folder(prompt)
            units.append(Unit(prompt=prompt, out=folder, options=options, settings_hash=settings_hash(options)))
        if not bad:
            jobs.append(Job(index=index, line=row.line, name=unique, video=merged["video"], units=units,
                            model_key=_model_key(merged)))
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        noun = "problem" if len(problems) == 1 else "problems"
        raise InputError(f"{path}: {len(problems)} {noun}, nothing was run: " + "; ".join(shown) + more)
    return jobs


# ----------------------------------------------------------------------------- outputs


def _write_json(path: Path, data) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_marker(out: Path) -> dict | None:
    """The ``batch.json`` of a finished prompt folder, or None when the folder is not a finished output."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not (Path(out) / "run.json").is_file() or not (Path(out) / "edited.mp4").is_file():
        return None
    return marker if isinstance(marker, dict) else None


def is_finished(unit: Unit) -> dict | None:
    marker = read_marker(unit.out)
    return marker if marker is not None and marker.get("settings_hash") == unit.settings_hash else None


def _remove_stale_staging(out: Path) -> None:
    """Leftovers of a killed worker's run of this prompt (edit_video's staging folders beside the output)."""
    parent = out.parent
    if not parent.is_dir():
        return
    for stale in parent.glob(f".{out.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty: a job folder left behind by a failed first prompt
    except OSError:
        pass


# ----------------------------------------------------------------------------- the worker (a Ray actor)


class Worker:
    """Runs jobs one after another with one loaded model (reloaded only when a job needs another).

    Made a Ray actor by :func:`run_batch` (``max_concurrency=2``: :meth:`status` answers while :meth:`run` works).
    """

    def __init__(self, threads: int | None = None):
        import torch

        quiet_model_libraries()
        if threads:
            torch.set_num_threads(threads)
        self._editor = None
        self._editor_key = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status: dict = {}

    def ready(self) -> dict:
        import torch

        from .models import resolve_device

        return dict(pid=os.getpid(), host=socket.gethostname(), device=str(resolve_device("auto")),
                    threads=torch.get_num_threads(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def cancel(self) -> None:
        self._cancel.set()

    def _set(self, **values) -> None:
        with self._lock:
            self._status.update(values)

    def _on_progress(self, event) -> None:
        stage = STAGES.index(event.stage) if event.stage in STAGES else 0
        self._set(stage=event.stage, fraction=(stage + event.fraction) / len(STAGES), eta_s=event.eta_s)

    def _editor_for(self, options) -> tuple[object, float]:
        """The editor for these options' model (loaded once; another model replaces it) and the load time."""
        key = _model_key(asdict(options))
        if self._editor is not None and key == self._editor_key:
            return self._editor, 0.0
        from .editor import TokenFlowEditor
        from .models import parse_lora

        if self._editor is not None:  # another model: free the old one first
            import gc

            import torch

            self._editor = self._editor_key = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        started = time.perf_counter()
        editor = TokenFlowEditor.from_pretrained(
            options.model, device=options.device, dtype=options.dtype,
            loras=[parse_lora(spec) for spec in options.lora],
            controlnet=options.controlnet if options.mode == "controlnet" else None, offload=options.offload,
        )
        self._editor, self._editor_key = editor, key
        return editor, time.perf_counter() - started

    def run(self, units: list[dict]) -> list[dict]:
        """Edit each unit (dict: prompt, out, options, settings_hash) in order; one outcome dict per unit."""
        outcomes = []
        for number, unit in enumerate(units):
            self._set(unit=number, stage=None, fraction=0.0, eta_s=None, finished=len(outcomes))
            outcomes.append(self._run_unit(unit))
        self._set(unit=None, stage=None, fraction=0.0, eta_s=None, finished=len(outcomes))
        return outcomes

    def _run_unit(self, unit: dict) -> dict:
        from .events import Cancelled
        from .runner import RunOptions, edit_video

        out = Path(unit["out"])
        done = read_marker(out)
        if done is not None and done.get("settings_hash") == unit["settings_hash"]:  # finished before a retry
            return dict(status="done", seconds=done.get("seconds"), timings=done.get("timings", {}),
                        cache_hit=done.get("inversion_cache_hit"), reused=True)
        started = time.perf_counter()
        try:
            if self._cancel.is_set():
                raise Cancelled("cancelled")
            options = RunOptions(**unit["options"], out=out, quiet=True)
            editor, load_seconds = self._editor_for(options)
            _remove_stale_staging(out)
            result = edit_video(options, editor=editor, progress=self._on_progress, cancel=self._cancel)
        except Cancelled:
            _remove_if_empty(out.parent)
            return dict(status="cancelled", seconds=time.perf_counter() - started, error="cancelled")
        except TokenFlowError as exc:
            _remove_if_empty(out.parent)
            return dict(status="failed", seconds=time.perf_counter() - started, error=" ".join(str(exc).split()),
                        error_type=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - reported in the summary; the other jobs go on
            _remove_if_empty(out.parent)
            return dict(status="failed", seconds=time.perf_counter() - started,
                        error=f"{type(exc).__name__}: {' '.join(str(exc).split())}", error_type=type(exc).__name__,
                        traceback=traceback.format_exc())
        seconds = time.perf_counter() - started
        timings = dict(result.report.get("timings", {}))
        if load_seconds:
            timings["load_model"] = round(load_seconds, 3)
        marker = dict(settings_hash=unit["settings_hash"], prompt=options.prompt, video=str(options.video),
                      seconds=round(seconds, 3), timings=timings, inversion_cache_hit=result.cache_hit,
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), options=unit["options"])
        _write_json(out / MARKER, marker)  # after the run folder is in place: its presence means finished
        return dict(status="done", seconds=seconds, timings=timings, cache_hit=result.cache_hit)


# ----------------------------------------------------------------------------- the driver


@dataclass
class BatchResult:
    """What a batch did: every job and prompt with its status, and where the summary is."""

    out: Path
    jobs: list[Job]
    summary: dict

    @property
    def counts(self) -> dict:
        return self.summary["counts"]

    @property
    def exit_code(self) -> int:
        """0 when every prompt of every job is done (now or by an earlier run), 1 otherwise."""
        return 0 if all(u.status in ("done", "skipped") for j in self.jobs for u in j.units) else 1

    def format_table(self) -> str:
        return format_table(self.jobs, self.out, self.summary)


def _summary(jobs: list[Job], out: Path, jobs_file: Path, info: dict) -> dict:
    counts: dict[str, int] = {}
    for job in jobs:
        for unit in job.units:
            counts[unit.status] = counts.get(unit.status, 0) + 1
    return dict(
        jobs_file=str(jobs_file),
        out=str(out),
        **info,
        counts=counts,
        jobs=[dict(name=job.name, line=job.line, video=job.video, attempts=job.attempts, prompts=[dict(
            prompt=u.prompt, status=u.status, out=str(u.out), settings_hash=u.settings_hash,
            seconds=None if u.seconds is None else round(u.seconds, 3), timings=u.timings,
            inversion_cache_hit=u.cache_hit, worker=u.worker, error=u.error, error_type=u.error_type,
            traceback=u.traceback) for u in job.units]) for job in jobs],
    )


def format_table(jobs: list[Job], out: Path, summary: dict | None = None) -> str:
    rows = [("job", "prompt", "status", "time", "output / error")]
    for job in jobs:
        for unit in job.units:
            prompt = unit.prompt if len(unit.prompt) <= 32 else unit.prompt[:31] + "…"
            seconds = "" if unit.seconds is None else f"{unit.seconds:.1f}s"
            where = unit.error if unit.status in ("failed", "cancelled") else str(unit.out)
            rows.append((job.name, prompt, unit.status, seconds, where or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    counts = (summary or {}).get("counts") or {}
    total = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    lines.append(f"{total}; summary: {Path(out) / SUMMARY}")
    return "\n".join(lines)


class _Slot:
    """One worker actor and what it is doing."""

    def __init__(self, number: int):
        self.number = number
        self.actor = None
        self.ready_ref = None
        self.run_ref = None
        self.status_ref = None
        self.job: Job | None = None
        self.info: dict = {}
        self.status: dict = {}
        self.start_failures = 0
        self.dead_error: str | None = None
        self.model_key: tuple | None = None

    @property
    def state(self) -> str:
        if self.dead_error is not None:
            return "dead"
        if self.ready_ref is not None:
            return "starting"
        return "busy" if self.job is not None else "idle"


def _lock_out(out: Path):
    """Hold OUT/.batch.lock (one batch per output folder at a time); release it with ``.release()``."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / ".batch.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"`out` {out}: another tokenflow batch is writing there; wait for it or use another `out`"
                         ) from None
    return lock


def _start_ray(address: str | None, num_cpus: int):
    import ray

    if ray.is_initialized():
        return ray, False
    common = dict(namespace="tokenflow-batch", log_to_driver=False, logging_level=logging.WARNING)
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # a private instance started and stopped here: its token-authentication notice is noise
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = notice.level
        notice.setLevel(logging.ERROR)
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
        finally:
            notice.setLevel(level)
    else:
        if address.startswith("ray://"):  # Ray Client: the server's ray.init takes no driver settings
            common = dict(namespace=common["namespace"])
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"`address` {address}: cannot connect to a Ray cluster ({exc}); "
                             "start one with `ray start --head` or check the address") from exc
    return ray, True


def _plan_workers(ray, address, gpus_per_job: float, workers: int | None, jobs: int):
    """(workers, per-actor num_cpus, num_gpus, torch threads) for the cluster Ray is connected to."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    if gpus > 0:
        if gpus_per_job > gpus:
            raise InputError(f"`gpus_per_job` {gpus_per_job:g}: the cluster has {gpus:g} GPU(s)")
        fit = max(1, int(gpus // gpus_per_job + 1e-9))
        count = workers or fit
        if count > fit:
            logger.warning("--workers %d: only %d fit on %g GPU(s) at --gpus-per-job %g; the rest wait for GPUs",
                           count, fit, gpus, gpus_per_job)
            if address is None:
                count = fit
        count = min(count, jobs)
        # the CPU side of GPU workers (decoding, resizing) shares this machine's cores too
        threads = _env_threads() or (max(1, (os.cpu_count() or 1) // count) if address is None else None)
        return count, 1, gpus_per_job, threads
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if address is None:
        cpus = os.cpu_count() or 1
        count = min(workers or 1, jobs)
        return count, 1, 0, _env_threads() or max(1, cpus // count)
    count = min(workers or max(1, len(nodes)), jobs)
    smallest = min((n["Resources"]["CPU"] for n in nodes), default=1)
    per = max(1, min(int(smallest), int(resources.get("CPU", 1) // count)))
    return count, per, 0, _env_threads() or per


def _env_threads() -> int | None:
    """``OMP_NUM_THREADS`` of the driver's environment, the usual knob, for the CPU workers' torch threads."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


def run_batch(
    jobs_file: str | Path,
    out: str | Path | None = None,
    *,
    address: str | None = None,
    gpus_per_job: float = 1.0,
    retries: int = 2,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
    on_update: Callable[[dict], None] | None = None,
    poll_seconds: float = 0.25,
    threads: int | None = None,
) -> BatchResult:
    """Run every job of ``jobs_file`` on Ray workers; see the module docstring.

    ``address``: None starts a local Ray instance on this machine (shut down at the end; an already initialised
    Ray session is used as it is and left running), ``"auto"`` or ``"ray://HOST:PORT"`` an existing cluster.
    ``on_update``: called with a snapshot dict (workers with pid, job, stage, fraction; counts) about every
    ``poll_seconds`` while jobs run. ``threads``: torch threads per worker (default: ``OMP_NUM_THREADS`` when
    set, else the cores shared out among the workers on this machine; on a cluster's GPU workers, torch's
    default).

    Raises :class:`InputError` for a bad JOBS file or option before Ray starts; a Ctrl-C cancels the running jobs,
    writes the summary and re-raises ``KeyboardInterrupt``.
    """
    jobs_file = Path(jobs_file)
    if gpus_per_job <= 0:
        raise InputError(f"`gpus_per_job` {gpus_per_job:g}: must be more than 0 (fractions share a GPU)")
    if retries < 0:
        raise InputError(f"`retries` {retries}: must be 0 or more")
    if workers is not None and workers < 1:
        raise InputError(f"`workers` {workers}: must be at least 1")
    out = Path(out) if out is not None else Path("tokenflow-out") / (_slug(jobs_file.stem) or "batch")
    out = out.expanduser().resolve()
    jobs = load_jobs(jobs_file, out, cache_dir=cache_dir, remote=address is not None)
    if address is not None and cache_dir is None and not any(j.units[0].options.get("cache_dir") for j in jobs):
        logger.warning("no --cache-dir: each node keeps its own inversion cache; pass a shared folder so a video "
                       "is inverted once across the cluster")
    started_at, started = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_out(out)
    info: dict = dict(started_at=started_at,
                      cache_dir=None if cache_dir is None else str(Path(cache_dir).expanduser().resolve()),
                      retries=retries, ray=None)
    try:
        for job in jobs:
            for unit in job.units:
                marker = is_finished(unit)
                if marker is not None:
                    unit.status, unit.seconds = "skipped", marker.get("seconds")
                    unit.timings, unit.cache_hit = marker.get("timings", {}), marker.get("inversion_cache_hit")
        todo = [job for job in jobs if any(u.status == "pending" for u in job.units)]
        skipped = sum(u.status == "skipped" for j in jobs for u in j.units)
        if skipped:
            logger.info("%d prompt(s) already done with the same settings: skipped", skipped)
        if todo:
            try:
                import ray  # noqa: F401
            except ImportError as exc:
                raise InputError("tokenflow batch needs Ray: pip install 'tokenflow[batch]' (or pip install ray)"
                                 ) from exc
            _run_on_ray(todo, jobs, out, jobs_file, info, address, gpus_per_job, retries, workers, quiet,
                        on_update, poll_seconds, started, threads)
    finally:
        info["seconds"] = round(time.perf_counter() - started, 3)
        info["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        summary = _summary(jobs, out, jobs_file, info)
        _write_json(out / SUMMARY, summary)
        lock.release()
    return BatchResult(out=out, jobs=jobs, summary=summary)


def _worker_lost(exc: BaseException) -> bool:
    """A Ray error that means the worker process (or its node) went away, not an error of the job's code."""
    from ray import exceptions as rx

    if isinstance(exc, rx.RayTaskError):
        return False
    return isinstance(exc, rx.RayError)


def _message(error: BaseException, limit: int = 300) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


class _Scheduler:
    """The driver's loop: hands jobs to idle workers, collects outcomes, replaces dead workers and resubmits their
    jobs, and reports progress. Ray calls only; every edit happens in a :class:`Worker`."""

    def __init__(self, ray, remote_worker, count: int, threads, jobs, todo, out, jobs_file, info, retries,
                 started, quiet, on_update, poll_seconds):
        self.ray, self.remote_worker, self.threads = ray, remote_worker, threads
        self.jobs, self.pending = jobs, list(todo)
        self.out, self.jobs_file, self.info, self.started = out, jobs_file, info, started
        self.retries, self.on_update, self.poll_seconds = retries, on_update, poll_seconds
        self.slots = [_Slot(number) for number in range(count)]
        self.total = sum(u.status == "pending" for j in todo for u in j.units)
        self.bar, self.shown = None, 0.0
        if not quiet:
            from tqdm.auto import tqdm

            tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            self.bar = tqdm(total=self.total, desc="batch", unit="prompt", dynamic_ncols=True,
                            mininterval=0.5 if tty else 10,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total} prompts [{elapsed}<{remaining}{postfix}]")
        for slot in self.slots:
            self._start(slot)

    # -- workers

    def _start(self, slot: _Slot) -> None:
        slot.actor = self.remote_worker.remote(threads=self.threads)
        slot.ready_ref = slot.actor.ready.remote()
        slot.status, slot.model_key, slot.status_ref = {}, None, None

    def _kill(self, slot: _Slot) -> None:
        if slot.actor is not None:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _dispatch(self) -> None:
        """Idle workers take the next job, one needing the model they have loaded first."""
        alive = [s for s in self.slots if s.state != "dead"]
        if not alive and self.pending:
            error = next((s.dead_error for s in self.slots if s.dead_error), "no worker")
            for job in self.pending:
                _finish_job(job, "failed", f"no worker could start: {error}", "WorkerStartError")
            self.pending.clear()
        for slot in alive:
            if slot.state != "idle" or not self.pending:
                continue
            job = next((j for j in self.pending if j.model_key == slot.model_key), self.pending[0])
            self.pending.remove(job)
            job.attempts += 1
            slot.job, slot.model_key, slot.status = job, job.model_key, {}
            payload = []
            for unit in job.units:
                if unit.status == "pending":
                    unit.status, unit.worker = "running", dict(slot.info)
                    payload.append(dict(prompt=unit.prompt, out=str(unit.out), options=unit.options,
                                        settings_hash=unit.settings_hash))
            slot.run_ref = slot.actor.run.remote(payload)

    # -- results

    def _on_ready(self, slot: _Slot, value, error) -> None:
        if error is None:
            slot.info, slot.start_failures = value, 0
            return
        slot.start_failures += 1
        logger.warning("worker %d did not start (%s)", slot.number, _message(error))
        if slot.start_failures >= 3:
            slot.dead_error = _message(error)
        else:
            self._start(slot)

    def _on_run(self, slot: _Slot, value, error) -> None:
        job, slot.job = slot.job, None
        running = [u for u in job.units if u.status == "running"]
        if error is None:
            for unit, outcome in zip(running, value, strict=True):
                unit.status = outcome["status"]
                unit.seconds = outcome.get("seconds")
                unit.timings = outcome.get("timings") or {}
                unit.cache_hit = outcome.get("cache_hit")
                unit.error, unit.error_type = outcome.get("error"), outcome.get("error_type")
                unit.traceback = outcome.get("traceback")
        elif _worker_lost(error):
            logger.warning("worker %d (pid %s) died during job %s (attempt %d of %d): %s", slot.number,
                           slot.info.get("pid"), job.name, job.attempts, self.retries + 1, _message(error))
            self._kill(slot)
            self._start(slot)
            for unit in running:
                unit.status = "pending"
            if job.attempts <= self.retries:
                self.pending.insert(0, job)  # prompts it finished before dying are found done by the next one
            else:
                _finish_job(job, "failed", f"worker died {job.attempts} time(s); last: {_message(error)}",
                            "WorkerDied")
                for unit in running:  # what the last dead worker left half-written
                    _remove_stale_staging(unit.out)
                    _remove_if_empty(unit.out.parent)
        else:
            cause = getattr(error, "cause", None) or error
            _finish_job(job, "failed", _message(cause, 500), type(cause).__name__)

    # -- the loop

    def run(self) -> None:
        while True:
            self._dispatch()
            busy = [s for s in self.slots if s.state == "busy"]
            if not busy and not self.pending:
                return  # (workers still starting have nothing to do)
            for slot in busy:
                if slot.status_ref is None:
                    slot.status_ref = slot.actor.status.remote()
            refs = {getattr(s, kind): (s, kind) for s in self.slots for kind in ("ready_ref", "run_ref", "status_ref")
                    if getattr(s, kind) is not None}
            if not refs:
                time.sleep(self.poll_seconds)
                continue
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.poll_seconds)
            changed = False
            for ref in ready:
                slot, kind = refs[ref]
                setattr(slot, kind, None)
                try:
                    value, error = self.ray.get(ref), None
                except Exception as exc:  # noqa: BLE001 - sorted by the handlers
                    value, error = None, exc
                if kind == "status_ref":
                    if error is None and slot.job is not None:
                        slot.status = value
                elif kind == "ready_ref":
                    self._on_ready(slot, value, error)
                else:
                    self._on_run(slot, value, error)
                    changed = True
            if changed:
                self.info["seconds"] = round(time.perf_counter() - self.started, 3)
                _write_json(self.out / SUMMARY, _summary(self.jobs, self.out, self.jobs_file, self.info))
            self._report()

    def _report(self) -> None:
        units = [u for j in self.jobs for u in j.units]
        counts = {k: sum(u.status == k for u in units) for k in ("done", "failed", "running", "pending")}
        partial = sum(s.status.get("finished", 0) + s.status.get("fraction", 0.0)
                      for s in self.slots if s.state == "busy" and s.status)
        ended = counts["done"] + counts["failed"] + sum(u.status == "cancelled" for u in units)
        now = min(self.total, ended + partial)
        if self.bar is not None:
            starting = sum(s.state == "starting" for s in self.slots)
            self.bar.set_postfix_str(
                f"done={counts['done']} failed={counts['failed']} running={sum(s.state == 'busy' for s in self.slots)}"
                f" queued={len(self.pending)}" + (f" workers starting={starting}" if starting else ""), refresh=False)
            self.bar.update(now - self.shown)  # redraws at most every mininterval
            self.shown = now
        if self.on_update is not None:
            self.on_update(dict(counts=counts, workers=[
                dict(number=s.number, state=s.state, pid=s.info.get("pid"), host=s.info.get("host"),
                     job=s.job.name if s.job else None, stage=s.status.get("stage"), unit=s.status.get("unit"),
                     fraction=s.status.get("fraction", 0.0)) for s in self.slots]))

    def interrupt(self) -> None:
        """Ctrl-C: cancel the running edits (they remove their staging folders), stop the workers, and mark every
        prompt not finished as cancelled."""
        for slot in self.slots:
            if slot.state == "busy":
                try:
                    slot.actor.cancel.remote()
                except Exception:  # noqa: BLE001
                    pass
        refs = [s.run_ref for s in self.slots if s.run_ref is not None]
        if refs:
            try:
                self.ray.wait(refs, num_returns=len(refs), timeout=5)
            except Exception:  # noqa: BLE001
                pass
        self.close()
        for job in self.jobs:
            for unit in job.units:
                if unit.status in ("pending", "running"):
                    if is_finished(unit):
                        unit.status = "done"
                    else:
                        unit.status, unit.error, unit.error_type = "cancelled", "interrupted (Ctrl-C)", "Cancelled"
                        _remove_stale_staging(unit.out)  # what a worker killed mid-run left
                        _remove_if_empty(unit.out.parent)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for slot in self.slots:
            self._kill(slot)
            slot.actor = None


def _finish_job(job: Job, status: str, error: str, error_type: str) -> None:
    for unit in job.units:
        if unit.status in ("pending", "running"):
            unit.status, unit.error, unit.error_type = status, error, error_type


def _run_on_ray(todo, jobs, out, jobs_file, info, address, gpus_per_job, retries, workers, quiet, on_update,
                poll_seconds, started, threads_override):
    import torch

    local_gpus = torch.cuda.device_count() if address is None else 0
    requested = workers or (max(1, int(local_gpus // gpus_per_job)) if local_gpus else 1)
    t0 = time.perf_counter()
    ray, owned = _start_ray(address, num_cpus=max(1, min(requested, len(todo))))
    scheduler = None
    try:
        info["ray_start_seconds"] = round(time.perf_counter() - t0, 3)
        count, num_cpus, num_gpus, threads = _plan_workers(ray, address, gpus_per_job, workers, len(todo))
        if threads_override:
            threads = threads_override
        info["ray"] = dict(address=address or "local", workers=count, num_cpus_per_worker=num_cpus,
                           num_gpus_per_worker=num_gpus, threads_per_worker=threads,
                           cluster_resources={k: v for k, v in ray.cluster_resources().items()
                                              if k in ("CPU", "GPU", "memory")})
        logger.info("%d worker(s): %s", count,
                    f"{num_gpus:g} GPU each" if num_gpus else f"{threads or num_cpus} CPU thread(s) each")
        remote_worker = ray.remote(Worker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=2,
                                                   max_restarts=0, scheduling_strategy="SPREAD")
        scheduler = _Scheduler(ray, remote_worker, count, threads, jobs, todo, out, jobs_file, info, retries,
                               started, quiet, on_update, poll_seconds)
        try:
            scheduler.run()
        except KeyboardInterrupt:
            scheduler.interrupt()
            raise
    finally:
        if scheduler is not None:
            scheduler.close()
        if owned:
            ray.shutdown()


def main(jobs_file, out=None, *, address=None, gpus_per_job=1.0, retries=2, cache_dir=None, workers=None,
         quiet=False) -> int:
    """``tokenflow batch``: run, print the summary table, return the exit code (0 all done, 1 any failed, 130
    interrupted). Bad input raises :class:`InputError` (the CLI prints it as one line, exit 2)."""
    import click

    try:
        result = run_batch(jobs_file, out, address=address, gpus_per_job=gpus_per_job, retries=retries,
                           cache_dir=cache_dir, workers=workers, quiet=quiet)
    except KeyboardInterrupt:
        click.echo("tokenflow: interrupted; finished prompts are kept and a re-run skips them", err=True)
        return 130
    click.echo(result.format_table())
    return result.exit_code
