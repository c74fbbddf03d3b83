"""``tokenflow batch`` on a real local Ray instance (2 CPUs) and the tiny random-weight model.

Validation runs first and without Ray (a bad JOBS file must be refused before Ray starts); the rest share one Ray
session (module fixture) because starting Ray is the slow part. No mocks: worker death is a real SIGKILL of the
actor's process.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tokenflow.batch import MARKER, SUMMARY, is_finished, load_jobs, run_batch
from tokenflow.cli import main
from tokenflow.errors import InputError
from tokenflow.inversion import InversionCache

ray = pytest.importorskip("ray")

SMALL = dict(size=64, steps=2, inversion_steps=2, batch_size=4, device="cpu")


def _yaml_options(model: Path, **extra) -> str:
    values = {"model": str(model), **SMALL, **extra}
    return "".join(f"  {k}: {v}\n" for k, v in values.items())


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY).read_text())


def _units(summary: dict) -> dict:
    """(job name, prompt) -> that prompt's summary entry."""
    return {(job["name"], p["prompt"]): p for job in summary["jobs"] for p in job["prompts"]}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from tokenflow.testing import make_pan_clip

    root = tmp_path_factory.mktemp("batch-clips")
    make_pan_clip(root / "pan.mp4", num_frames=4, width=96, height=64, shift=4, fps=12, audio=False)
    make_pan_clip(root / "other.mp4", num_frames=4, width=96, height=64, shift=2, fps=12, audio=False,
                  image="coffee")
    (root / "broken.mp4").write_bytes(b"this is not a video\n" * 50)
    return root


# ----------------------------------------------------------------------------- validation (no Ray)


def test_bad_rows_are_reported_with_line_numbers_before_ray_starts(clips, tiny_model_dir, tmp_path, capsys):
    jobs = clips / "bad.yaml"
    jobs.write_text(
        "defaults:\n"                      # 1
        + _yaml_options(tiny_model_dir)    # 2-7
        + "jobs:\n"                        # 8
        "  - video: pan.mp4\n"             # 9
        "    prompt: a robot\n"            # 10
        "  - video: pan.mp4\n"             # 11
        "    prompt: a robot\n"            # 12
        "    stepz: 3\n"                   # 13  unknown option
        "  - video: other.mp4\n"           # 14  no prompt
        "  - video: other.mp4\n"           # 15
        "    prompt: a car\n"              # 16
        "    guidance_scale: lots\n"       # 17  bad type
        "  - prompt: no video\n"           # 18
        "  - video: pan.mp4\n"             # 19
        "    prompt: a cat\n"              # 20
        "    inversion_steps: 0\n"         # 21  RunOptions.check_inputs refuses it
    )
    out = tmp_path / "out"
    rc = main(["batch", str(jobs), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("tokenflow: error:"), err  # one line
    for expected in ("line 13: unknown option 'stepz' (did you mean 'steps'?)", "line 14: missing prompt",
                     "line 17: guidance_scale must be a number", "line 18: missing video",
                     "line 19: --inversion-steps 0"):
        assert expected in err, (expected, err)
    assert "line 9" not in err and "line 11:" not in err
    assert not out.exists()  # nothing written
    assert not ray.is_initialized()  # refused before Ray started


def test_a_second_batch_into_the_same_out_folder_is_refused_while_the_first_runs(clips, tiny_model_dir, tmp_path,
                                                                               capsys):
    """The output folder's lock is held by another process (a real one): one line, exit 2, before Ray starts."""
    import subprocess
    import sys

    jobs = clips / "one.yaml"
    jobs.write_text("defaults:\n" + _yaml_options(tiny_model_dir) + "jobs:\n  - video: pan.mp4\n    prompt: a robot\n")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(out / ".batch.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["batch", str(jobs), "--out", str(out), "--quiet"])
    finally:
        holder.communicate("", timeout=30)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "another tokenflow batch is writing there" in err, err
    assert not ray.is_initialized() and not (out / SUMMARY).exists()


def test_jsonl_and_csv_carry_the_same_fields_and_line_numbers(clips, tiny_model_dir, tmp_path):
    jsonl = clips / "jobs.jsonl"
    jsonl.write_text(
        json.dumps({"defaults": {"model": str(tiny_model_dir), **SMALL}}) + "\n"
        + json.dumps({"video": "pan.mp4", "prompts": ["a robot", "a dog"], "seed": 3}) + "\n\n"
        + json.dumps({"video": "other.mp4", "prompt": "a car"}) + "\n"
    )
    jobs = load_jobs(jsonl, tmp_path / "out")
    assert [(j.name, j.line, len(j.units)) for j in jobs] == [("pan", 2, 2), ("other", 4, 1)]
    assert jobs[0].units[0].options["seed"] == 3 and jobs[0].units[0].options["inversion_steps"] == 2
    assert jobs[0].units[0].out.parent == tmp_path / "out" / "pan"
    assert jobs[0].units[0].settings_hash != jobs[0].units[1].settings_hash

    table = clips / "jobs.csv"
    table.write_text(
        "video,prompts,size,steps,inversion_steps,batch_size,device,model,save_latents\n"
        f"pan.mp4,a robot|a dog,64,2,2,4,cpu,{tiny_model_dir},yes\n"
        f"other.mp4,a car,64,two,2,4,cpu,{tiny_model_dir},no\n"
    )
    with pytest.raises(InputError, match=r"line 3: steps must be a whole number"):
        load_jobs(table, tmp_path / "out")
    table.write_text(table.read_text().replace(",two,", ",2,"))
    jobs = load_jobs(table, tmp_path / "out")
    assert [u.prompt for u in jobs[0].units] == ["a robot", "a dog"]
    assert jobs[0].units[0].options["save_latents"] is True and jobs[1].units[0].options["steps"] == 2


# ----------------------------------------------------------------------------- real runs on a shared Ray session


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-batch")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def first_batch(ray_session, clips, tiny_model_dir, tmp_path_factory):
    """3 jobs: one video with two prompts, another video, a broken file; 2 workers."""
    root = tmp_path_factory.mktemp("batch")
    jobs = clips / "jobs.yaml"
    jobs.write_text(
        "defaults:\n" + _yaml_options(tiny_model_dir)
        + "jobs:\n"
        "  - video: pan.mp4\n"
        "    prompts: [a shiny robot, a watercolor painting]\n"
        "  - video: other.mp4\n"
        "    prompt: a red car\n"
        "    seed: 1\n"
        "  - video: broken.mp4\n"
        "    prompt: anything\n"
    )
    out, cache = root / "out", root / "cache"
    result = run_batch(jobs, out, cache_dir=cache, workers=2, quiet=True, threads=1)
    return result, jobs, out, cache


def test_good_jobs_finish_and_the_broken_one_fails_alone(first_batch):
    from tokenflow.io import load_frames

    result, _, out, cache = first_batch
    assert result.exit_code == 1
    summary = _summary(out)
    units = _units(summary)
    assert summary["counts"] == {"done": 3, "failed": 1}, [u["error"] for u in units.values()]
    broken = units[("broken", "anything")]
    assert broken["status"] == "failed" and broken["error_type"] == "InputError"
    assert "not a readable video" in broken["error"]
    for key in (("pan", "a shiny robot"), ("pan", "a watercolor painting"), ("other", "a red car")):
        unit = units[key]
        assert unit["status"] == "done" and unit["error"] is None and unit["seconds"] > 0
        folder = Path(unit["out"])
        assert folder.parent == out / key[0]
        frames = load_frames(folder / "edited.mp4")[0]
        assert frames.shape == (4, 64, 96, 3)
        marker = json.loads((folder / MARKER).read_text())
        assert marker["settings_hash"] == unit["settings_hash"]
        assert json.loads((folder / "run.json").read_text())["prompt"] == key[1]
    # the video with two prompts was inverted once, by the same worker; the second prompt hit the cache
    first, second = units[("pan", "a shiny robot")], units[("pan", "a watercolor painting")]
    assert first["worker"]["pid"] == second["worker"]["pid"]
    run1 = json.loads((Path(first["out"]) / "run.json").read_text())
    run2 = json.loads((Path(second["out"]) / "run.json").read_text())
    assert run1["inversion_cache_hit"] is False and run2["inversion_cache_hit"] is True
    assert second["inversion_cache_hit"] is True
    assert len(InversionCache(cache).entries()) == 2  # one entry per readable video
    assert first["timings"]["load_model"] > 0 and second["timings"]["load_model"] == 0  # loaded once
    assert not [p for p in out.rglob(".*") if p.is_dir()]  # no staging leftovers


def test_rerun_skips_finished_jobs_and_does_no_work_for_them(first_batch, capsys):
    result, jobs, out, cache = first_batch
    done = [Path(u.out) for j in result.jobs for u in j.units if u.status == "done"]
    stamps = {p: (p / "edited.mp4").stat().st_mtime_ns for p in done}
    entries = sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir())
    rc = main(["batch", str(jobs), "--out", str(out), "--cache-dir", str(cache), "--quiet"])
    table = capsys.readouterr().out
    assert rc == 1  # the broken file is tried again and fails again
    units = _units(_summary(out))
    assert [u["status"] for u in units.values()] == ["skipped", "skipped", "skipped", "failed"]
    assert "3 skipped" in table and "1 failed" in table
    assert {p: (p / "edited.mp4").stat().st_mtime_ns for p in done} == stamps  # outputs untouched
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) == entries  # nothing inverted

    # without the broken job there is nothing to do at all: no worker is started
    good = jobs.with_name("good.yaml")
    good.write_text(jobs.read_text().split("  - video: broken.mp4")[0])
    rerun = run_batch(good, out, cache_dir=cache, quiet=True)
    assert rerun.exit_code == 0 and rerun.summary["ray"] is None
    assert rerun.summary["counts"] == {"skipped": 3}

    # another setting for one prompt: only that prompt would run again
    changed = jobs.with_name("changed.yaml")
    changed.write_text(good.read_text().replace("    seed: 1\n", "    seed: 2\n"))
    planned = load_jobs(changed, out, cache_dir=cache)
    assert [(u.prompt, is_finished(u) is not None) for j in planned for u in j.units] == [
        ("a shiny robot", True), ("a watercolor painting", True), ("a red car", False)]


def test_a_killed_worker_is_replaced_and_its_job_retried(ray_session, clips, tiny_model_dir, tmp_path):
    """Two jobs on two workers: "slow" loses its worker once and completes on a fresh one; "doomed" loses every
    worker it gets and fails once its retries are used up. Each kill is a SIGKILL of the actor's process in the
    middle of the job's inversion (many inversion steps keep it busy long enough)."""
    jobs = clips / "slow.yaml"
    jobs.write_text("defaults:\n" + _yaml_options(tiny_model_dir, inversion_steps=60) + "jobs:\n"
                    "  - video: pan.mp4\n    prompt: a slow robot\n    name: slow\n"
                    "  - video: other.mp4\n    prompt: a doomed robot\n    name: doomed\n")
    killed: dict[int, str] = {}

    def kill(state: dict) -> None:
        for worker in state["workers"]:
            job, pid = worker["job"], worker["pid"]
            if worker["stage"] != "inversion" or worker["fraction"] <= 0 or pid in killed:
                continue
            if job == "doomed" or (job == "slow" and "slow" not in killed.values()):
                os.kill(pid, signal.SIGKILL)
                killed[pid] = job

    out = tmp_path / "out"
    result = run_batch(jobs, out, cache_dir=tmp_path / "cache", retries=1, workers=2, quiet=True, on_update=kill,
                       threads=1)
    assert sorted(killed.values()) == ["doomed", "doomed", "slow"], killed
    assert result.exit_code == 1
    summary = _summary(out)
    slow, doomed = summary["jobs"]
    assert slow["attempts"] == 2 and slow["prompts"][0]["status"] == "done"
    assert slow["prompts"][0]["worker"]["pid"] not in killed  # finished by a fresh worker
    assert (Path(slow["prompts"][0]["out"]) / "edited.mp4").is_file()
    assert doomed["attempts"] == 2 and doomed["prompts"][0]["status"] == "failed"
    assert doomed["prompts"][0]["error_type"] == "WorkerDied"
    assert "worker died 2 time(s)" in doomed["prompts"][0]["error"]
    assert not [p for p in out.rglob(".*") if p.is_dir()]  # the killed run's staging folder was removed
