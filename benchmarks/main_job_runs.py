"""The README's main command over several seeds and torch thread counts, sparse and dense: every run, the mean and
the worst case, as a Markdown table and a JSON file.

    python benchmarks/main_job_runs.py --seeds 0 1 2 --threads 1 2 --models sparse dense \
        --output benchmarks/results/main_job_runs.json

Each run is a fresh `sparsemoe-vlm train` process with `OMP_NUM_THREADS` and `torch.set_num_threads` set to its
thread count. One-thread runs go two at a time (one per core of a 2-core machine); two-thread runs go alone, so no
run shares its cores. Runs already in the output JSON are kept (the script resumes), and a run whose folder already
holds its final metrics (its driver was stopped after launching it) is recorded without running it again; extra `train`
arguments go after `--`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hf_sparsemoe_vlm.app.model_card import results_path


FIGURES = ("test_exact_match", "test_exact_match_image_first", "test_exact_match_question_first",
           "test_exact_match_position", "test_exact_match_position_image_first",
           "test_exact_match_position_question_first", "test_exact_match_caption", "train_minutes")
MODEL_FLAGS = {"sparse": [], "dense": ["--dense_baseline", "true"]}


def run_key(model: str, seed: int, threads: int) -> str:
    return f"{model}/seed{seed}/threads{threads}"


def run_folder(runs_dir: Path, model: str, seed: int, threads: int) -> Path:
    return runs_dir / f"{model}-seed{seed}-threads{threads}"


def launch(model: str, seed: int, threads: int, runs_dir: Path, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    output = run_folder(runs_dir, model, seed, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = (f"import sys, torch; torch.set_num_threads({threads}); from hf_sparsemoe_vlm.app.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    command = [sys.executable, "-c", code, "train", "--output_dir", str(output), "--seed", str(seed),
               "--save_strategy", "no", "--disable_tqdm", "true", *MODEL_FLAGS[model], *extra]
    log = open(output.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), output


def table(results: dict[str, dict]) -> str:
    lines = ["| model | seed | threads | exact match (both orders) | image first | question first | position "
             "(image first / question first) | captions exact | train minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def pct(value):
        return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"

    by_model: dict[str, list[dict]] = {}
    for key in sorted(results):
        model, seed, threads = key.split("/")
        m = results[key]
        by_model.setdefault(model, []).append(m)
        lines.append(f"| {model} | {seed.removeprefix('seed')} | {threads.removeprefix('threads')} | "
                     f"{pct(m.get('test_exact_match'))} | {pct(m.get('test_exact_match_image_first'))} | "
                     f"{pct(m.get('test_exact_match_question_first'))} | {pct(m.get('test_exact_match_position'))} "
                     f"({pct(m.get('test_exact_match_position_image_first'))} / "
                     f"{pct(m.get('test_exact_match_position_question_first'))}) | "
                     f"{pct(m.get('test_exact_match_caption'))} | {m.get('train_minutes', '-')} |")
    for model, runs in by_model.items():
        for name, reduce in (("mean", statistics.fmean), ("worst", min)):
            def agg(key, runs=runs, reduce=reduce):
                values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
                return pct(reduce(values)) if values else "-"
            minutes = [r["train_minutes"] for r in runs if "train_minutes" in r]
            worst_minutes = max(minutes) if minutes else "-"
            lines.append(f"| **{model} {name}** ({len(runs)} runs) | | | **{agg('test_exact_match')}** | "
                         f"{agg('test_exact_match_image_first')} | {agg('test_exact_match_question_first')} | "
                         f"{agg('test_exact_match_position')} ({agg('test_exact_match_position_image_first')} / "
                         f"{agg('test_exact_match_position_question_first')}) | {agg('test_exact_match_caption')} | "
                         f"{round(statistics.fmean(minutes), 1) if name == 'mean' and minutes else worst_minutes} |")
        spread = [r["test_exact_match"] for r in runs if "test_exact_match" in r]
        if len(spread) > 1:
            lines.append(f"| {model}: mean +- standard deviation | | | {100 * statistics.fmean(spread):.1f} +- "
                         f"{100 * statistics.stdev(spread):.1f} | | | | | |")
    return "\n".join(lines)


def record(results: dict[str, dict], key: str, folder: Path, output: Path) -> None:
    metrics = json.loads(results_path(folder).read_text())
    results[key] = {k: metrics[k] for k in FIGURES if k in metrics}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["sparse", "dense"], choices=sorted(MODEL_FLAGS))
    parser.add_argument("--runs_dir", default="runs/main_job_runs")
    parser.add_argument("--output", default="benchmarks/results/main_job_runs.json")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the runs may share.")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    runs_dir, output = Path(args.runs_dir), Path(args.output)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = json.loads(output.read_text()) if output.is_file() else {}
    pending = [(m, s, t) for t in sorted(args.threads) for m in args.models for s in args.seeds
               if run_key(m, s, t) not in results]
    for job in list(pending):
        folder = run_folder(runs_dir, *job)
        if results_path(folder).is_file():  # finished, but its driver stopped before recording it
            pending.remove(job)
            record(results, run_key(*job), folder, output)
            print(f"recorded finished {run_key(*job)}: {results[run_key(*job)]}", flush=True)
    running: list[tuple[tuple, subprocess.Popen, Path]] = []
    while pending or running:
        used = sum(job[2] for job, _, _ in running)
        if pending and used + pending[0][2] <= args.cores:
            job = pending.pop(0)
            process, folder = launch(*job, runs_dir, extra)
            running.append((job, process, folder))
            print(f"started {run_key(*job)}", flush=True)
            continue
        time.sleep(5)
        for entry in list(running):
            job, process, folder = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if process.returncode != 0:
                print(f"FAILED {run_key(*job)} (exit {process.returncode}); see {folder.with_suffix('.log')}")
                continue
            record(results, run_key(*job), folder, output)
            print(f"done {run_key(*job)}: {results[run_key(*job)]}", flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
