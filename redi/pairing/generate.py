"""`redi data generate`: sample N traces per problem from a teacher, label each with a grader, and write the
flat file that `redi data pair` reads as it is (``traces.jsonl``) plus ``report.json``.

Default prompting is the one OpenR1-Math's traces were made with (docs/generate.md cites it): no system turn,
the user turn ``You will be given a problem. Please reason step by step, and put your final answer within
\\boxed{}:\\n{problem}`` in the teacher's chat template, T 0.6, top-p 0.95, 16,384 new tokens, 4 samples; and the
generation opens with ``<think>\\n`` (DeepSeek-R1's recommendation; OpenR1's traces start with it).

Labels: a trace is correct only if it ended by itself (finish reason ``stop``), its think block closed, and
the grader accepts its last ``\\boxed{}`` after ``</think>``. Each row keeps every trace's verdict, extracted
answer, finish reason and token count beside the ``correct`` list that `redi data pair` uses.

Resume: problems are generated in fixed chunks (chunk k = problems k*B .. k*B+B-1 of the input order, engine
seed = seed + k) and a chunk's rows are appended in one write once all of its traces are labelled. A problem
in the file is never generated again; a chunk cut short by a kill is generated again from the start with the
same seed, so an interrupted run and an uninterrupted one hold the same traces. A torn last line (a kill
mid-write) is cut off on resume.

Core module: no torch, mlx or vllm imports; the engine comes from ``redi.evaluation.engines``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from redi.errors import UserError
from redi.evaluation.engines import Completion, check_sampling  # Completion: what an engine returns per trace
from redi.evaluation.grading import GRADERS
from redi.gguf import model_folder

# open-r1 scripts/generate_reasoning.py, the script behind OpenR1-Math (its --prompt-template default).
OPENR1_INSTRUCTION = ("You will be given a problem. Please reason step by step, and put your final answer within "
                      "\\boxed{}:\n{problem}")
THINK_OPEN = "<think>\n"
TRACES_FILE = "traces.jsonl"
REPORT_FILE = "report.json"
# Per-trace verdicts; only "correct" counts as correct.
VERDICTS = ("correct", "wrong", "truncated", "format_error", "timeout")


@dataclass
class GenerateSettings:
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 16384
    system_prompt: str | None = None  # None: no system turn (OpenR1's traces had none)
    instruction: str = OPENR1_INSTRUCTION  # the user turn; "{problem}" is replaced by the problem text
    chat_template: bool = True  # False: the instruction text is the whole prompt (base models, the demo teacher)
    force_think: bool = True
    grader: str = "math-verify"
    engine: str | None = None  # vllm | native | None (vLLM when it imports)
    backend: str = ""  # the native engine's backend (cpu | cuda | mlx; default as redi train)
    seed: int = 0
    chunk_problems: int = 64  # problems per engine call: the unit of resume
    id_field: str | None = None
    limit: int = 0
    workers: int | None = None  # grading processes

    def check(self) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.chunk_problems < 1:
            raise UserError("--samples, --max-new-tokens and --chunk-problems must be at least 1")
        check_sampling(self.temperature, self.top_p)
        if "{problem}" not in self.instruction:
            raise UserError("--instruction must contain {problem}, where the problem text goes")
        if self.grader not in GRADERS:
            raise UserError(f"--grader must be one of {', '.join(GRADERS)}, got {self.grader!r}")

    def guarded(self, teacher: str, problems: str, engine: str) -> dict:
        """What must not change between a run and its resume (the traces would differ)."""
        keep = ("samples", "temperature", "top_p", "max_new_tokens", "system_prompt", "instruction",
                "chat_template", "force_think", "grader", "seed", "chunk_problems", "id_field")
        from redi.evaluation.settings import model_identity

        values = asdict(self)
        return {"teacher": model_identity(teacher), "problems": model_identity(problems), "engine": engine,
                **{k: values[k] for k in keep}}


# --------------------------------------------------------------------------------------------- problems


def load_problems(spec: str, id_field: str | None = None, limit: int = 0) -> list[dict]:
    """``[{"id", "problem", "answer"}]`` with the loader of `redi eval`; ids must be unique (resume keys)."""
    from redi.evaluation.pipeline import load_benchmark

    _, problems = load_benchmark(spec, limit, id_field=id_field)
    seen: dict[str, int] = {}
    for row, problem in enumerate(problems, start=1):
        key = str(problem["id"])
        if key in seen:
            raise UserError(f"{spec} row {row}: id {key!r} repeats row {seen[key]}; ids key the resume, "
                            f"pass --id-field with a unique column")
        seen[key] = row
    return problems


def render_prompt(tokenizer: Any, problem: str, s: GenerateSettings) -> str:
    """The teacher's prompt text: the instruction around the problem, in the chat template unless disabled."""
    user = s.instruction.replace("{problem}", problem)
    if not s.chat_template:
        return user + (THINK_OPEN if s.force_think else "")
    from redi.evaluation.pipeline import EvalSettings, render_prompt as render_chat

    # One rule for the chat turn and the <think> opener: redi eval's, with the problem already wrapped.
    return render_chat(tokenizer, user, EvalSettings(system_prompt=s.system_prompt, template="raw",
                                                     force_think=s.force_think))


# ------------------------------------------------------------------------------------------------ labels


def _grade(responses: list[str], answers: list, s: GenerateSettings):
    from redi.evaluation.grading import grade_many

    return grade_many(responses, answers, workers=s.workers, require_think=s.force_think, grader=s.grader)


def label_problems(problems: Sequence[dict], completions: Sequence[Sequence[Completion]],
                   s: GenerateSettings) -> list[dict]:
    """Grade every trace and build one output row per problem: the function engine output goes to.

    ``completions[i]``: problem i's traces as the engine returned them (text after the forced opener).

    Row: ``problem_id, problem, answer, generations, correct`` (what `redi data pair` reads, schema ``flat``)
    and per trace ``verdicts, extracted_answers, finish_reasons, num_tokens``.
    """
    opener = THINK_OPEN if s.force_think else ""
    responses = [[opener + c.text for c in traces] for traces in completions]
    flat = [r for traces in responses for r in traces]
    answers = [p["answer"] for p, traces in zip(problems, responses) for _ in traces]
    verdicts = iter(_grade(flat, answers, s))
    rows = []
    for problem, traces, texts in zip(problems, completions, responses):
        labels, extracted = [], []
        for trace in traces:
            v = next(verdicts)
            extracted.append(v.extracted)
            if trace.finish_reason != "stop":
                labels.append("truncated")  # cut at max_new_tokens: never a positive, whatever it boxed
            elif v.format_error:
                labels.append("format_error")  # unclosed think block or no answer
            elif v.timed_out:
                labels.append("timeout")
            else:
                labels.append("correct" if v.correct else "wrong")
        rows.append({"problem_id": str(problem["id"]), "problem": problem["problem"], "answer": problem["answer"],
                     "generations": texts, "correct": [label == "correct" for label in labels],
                     "verdicts": labels, "extracted_answers": extracted,
                     "finish_reasons": [t.finish_reason for t in traces],
                     "num_tokens": [len(t.token_ids) for t in traces]})
    return rows


# ------------------------------------------------------------------------------------------ traces file


def read_done(path: Path) -> dict[str, dict]:
    """Rows already in the traces file, by problem id; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
    done: dict[str, dict] = {}
    for line_no, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = str(row["problem_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{line_no}: not a trace row of redi data generate") from None
        if key in done:
            raise UserError(f"{path}:{line_no}: problem {key!r} appears twice")
        done[key] = row
    return done


def append_rows(path: Path, rows: list[dict]) -> None:
    """One write per chunk, then fsync: a kill leaves whole chunks (or a torn tail that read_done cuts)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------ report


def _pairable(n: int, c: int, k: int) -> float:
    """Chance that k of n traces (c correct), drawn without replacement, hold a correct and a wrong one."""
    total = math.comb(n, k)
    return 1.0 - (math.comb(c, k) + math.comb(n - c, k)) / total


def build_report(rows: Sequence[dict], samples: int, timing: dict | None = None) -> dict:
    """Counts over the traces file: solved distribution, truncation, tokens, and pairs as a function of N."""
    traces = [(v, f, t) for row in rows for v, f, t in zip(row["verdicts"], row["finish_reasons"], row["num_tokens"])]
    correct_counts = [sum(row["correct"]) for row in rows]
    n = samples
    verdicts = {name: sum(v == name for v, _, _ in traces) for name in VERDICTS}
    pairable = sum(0 < c < len(row["correct"]) for c, row in zip(correct_counts, rows))
    by_n = {}
    for k in range(1, n + 1):
        # Observed: the first k samples of each problem (sample order is random, so any k would do).
        first_k = sum(any(row["correct"][:k]) and not all(row["correct"][:k]) for row in rows)
        expected = sum(_pairable(len(row["correct"]), c, k) for c, row in zip(correct_counts, rows))
        by_n[str(k)] = {"pairable_first_k": first_k, "pairable_expected": round(expected, 3)}
    tokens = sum(t for _, _, t in traces)
    report = {
        "problems": len(rows),
        "traces": len(traces),
        "samples_per_problem": n,
        "correct_traces": verdicts["correct"],
        "verdicts": verdicts,
        "correct_per_problem": {"0": sum(c == 0 for c in correct_counts),
                                f"1..{n - 1}": sum(0 < c < n for c in correct_counts),
                                str(n): sum(c == n for c in correct_counts)},
        "correct_per_problem_histogram": {str(c): correct_counts.count(c) for c in range(n + 1)},
        "pairable_problems": pairable,
        "pairable_note": "a problem yields a pair only with at least one correct and one incorrect trace",
        "pairable_by_samples": by_n,
        "sft_problems": sum(c > 0 for c in correct_counts),
        "tokens_generated": tokens,
        "mean_trace_tokens": tokens / len(traces) if traces else 0.0,
        "truncation_rate": (sum(f != "stop" for _, f, _ in traces) / len(traces)) if traces else 0.0,
    }
    if timing:
        report["this_run"] = timing
    return report


# -------------------------------------------------------------------------------------------- the run


@dataclass
class GenerateResult:
    out_dir: Path
    report: dict
    generated_problems: int  # in this invocation (0 when everything was already done)


def _chunks(problems: list[dict], size: int) -> list[tuple[int, list[dict]]]:
    return [(k, problems[k * size:(k + 1) * size]) for k in range(math.ceil(len(problems) / size))]


def _run_chunks(engine: Any, tokenizer: Any, problems: list[dict], done: dict, s: GenerateSettings,
                traces_path: Path, stop_ids: list[int], on_chunk: Callable[[int, int], None] | None) -> dict:
    """Generate, label and append every chunk with unfinished problems; returns this run's timing."""
    todo = [(k, [p for p in chunk if str(p["id"]) not in done]) for k, chunk in _chunks(problems, s.chunk_problems)]
    todo = [(k, chunk) for k, chunk in todo if chunk]
    seconds = tokens = traces = 0
    finished = 0
    for k, chunk in todo:
        prompts = [render_prompt(tokenizer, p["problem"], s) for p in chunk]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
        started = time.perf_counter()
        outputs = engine.generate(ids, n=s.samples, temperature=s.temperature, top_p=s.top_p,
                                  max_new_tokens=s.max_new_tokens, seed=s.seed + k, stop_token_ids=stop_ids)
        seconds += time.perf_counter() - started
        tokens += sum(len(c.token_ids) for outs in outputs for c in outs)
        traces += sum(len(outs) for outs in outputs)
        append_rows(traces_path, label_problems(chunk, outputs, s))
        finished += len(chunk)
        if on_chunk:
            on_chunk(finished, sum(len(c) for _, c in todo))
    return {"problems_generated": finished, "traces_generated": traces, "tokens_generated": tokens,
            "generation_seconds": round(seconds, 3),
            "traces_per_second": round(traces / seconds, 3) if seconds else None,
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None}


def generate_traces(teacher: str, problems_spec: str, output: str | Path, s: GenerateSettings, *,
                    force: bool = False, on_chunk: Callable[[int, int], None] | None = None,
                    engine: Any = None) -> GenerateResult:
    """The whole of `redi data generate`: load, guard the folder, generate what is missing, report.

    ``engine``: an already started engine for ``teacher`` (benchmarks reuse one across runs); default: start one
    when something is left to generate."""
    from redi.evaluation.engines import default_engine, make_engine, stop_token_ids
    from redi.evaluation.settings import guard_settings
    from redi.training.api import load_tokenizer

    s.check()
    out = Path(output)
    problems = load_problems(problems_spec, s.id_field, s.limit)
    if not problems:
        raise UserError(f"{problems_spec}: no problems")
    from redi.evaluation.settings import SETTINGS_FILE
    from redi.outputs import refuse_overwriting_inputs

    refuse_overwriting_inputs([Path(problems_spec).expanduser()],
                              [out / name for name in (TRACES_FILE, REPORT_FILE, SETTINGS_FILE)])
    out.mkdir(parents=True, exist_ok=True)
    engine_name = s.engine or default_engine()
    guard_settings(out, s.guarded(teacher, problems_spec, engine_name), force=force, data_file=TRACES_FILE)
    traces_path = out / TRACES_FILE
    done = read_done(traces_path)
    timing = None
    if any(str(p["id"]) not in done for p in problems):
        teacher_dir = model_folder(teacher)  # a .gguf file: its converted HF folder
        tokenizer = engine.tokenizer if engine is not None else load_tokenizer(teacher_dir)
        if engine is None:
            engine = make_engine(engine_name, teacher_dir, backend=s.backend, seed=s.seed, tokenizer=tokenizer)
        timing = _run_chunks(engine, tokenizer, problems, done, s, traces_path,
                             stop_token_ids(tokenizer, teacher_dir), on_chunk)
    wanted = {str(p["id"]) for p in problems}
    rows = [row for key, row in read_done(traces_path).items() if key in wanted]
    report = build_report(rows, s.samples, timing)
    report.update(teacher=teacher, problems_file=problems_spec, traces_file=str(traces_path),
                  settings=s.guarded(teacher, problems_spec, engine_name))
    tmp = out / f".{REPORT_FILE}.partial"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / REPORT_FILE)
    return GenerateResult(out, report, timing["problems_generated"] if timing else 0)
