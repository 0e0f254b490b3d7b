"""`redi eval`: the paper's evaluation protocol (redi-spec.md §5) on any engine.

Problems: the paper's five files, shipped (``--benchmark math500`` etc.). Prompt: the paper's evaluation
instruction inside the model's chat template, with the Qwen-Math system prompt, and the generation forced
to open with ``<think>`` as rllm did (``<|im_start|>assistant<think>\\n``: no newline before ``<think>``).
Sampling: T 0.6, top-p 0.95, 16 samples, by vLLM or the backend's sampler (redi.evaluation.engines), both
stopping at EOS, ``<|im_end|>`` and the generation config's eos. Grading: redi.evaluation.grading, with
rllm's reward for the paper's template (its numbers are the paper's). Samples are appended to
``samples.jsonl`` as they are generated, so an interrupted run resumes without regenerating them (the folder's
settings.json must match), and the file is directly gradeable by ``redi grade``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redi.atomic import kill_point, recover_jsonl
from redi.errors import UserError
from redi.gguf import model_folder

EVAL_PROMPT = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think step "
    "by step before answering.\n\n{Question}"
)
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# The paper's five problem sets, shipped (redi/evaluation/benchmarks/, provenance in docs/benchmarks.md):
# rllm's test files that produced the paper's tables. 500 + 30 + 83 + 272 + 675 = 1,560 problems.
PAPER_BENCHMARKS = {"math500": "math.json", "aime24": "aime.json", "amc23": "amc.json", "minerva": "minerva.json",
                    "olympiadbench": "olympiad_bench.json"}
# Hub uploads under explicit names (hf:math500, or hf:owner/dataset[@split]); their golds and sizes differ
# from the paper's (the hub's amc23 has 40 problems, not 83).
HUB_BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "amc23": ("math-ai/amc23", "test"),
    "minerva": ("math-ai/minervamath", "test"),
    "olympiadbench": ("math-ai/olympiadbench", "test"),
}
PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "gold")
ID_KEYS = ("id", "unique_id", "idx")


@dataclass
class EvalSettings:
    samples: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    force_think: bool = True
    system_prompt: str | None = QWEN_MATH_SYSTEM  # None: no system turn
    template: str = "paper"  # paper: EVAL_PROMPT; raw: the problem text alone
    seed: int = 0
    batch_size: int = 64  # the native engine's concurrent rows
    workers: int | None = None
    limit: int = 0
    grader: str | None = None  # None: rllm with the paper's template (its numbers are the paper's), else math-verify
    engine: str | None = None  # None: vllm when it imports, else native
    tensor_parallel: int = 1
    data_parallel: int = 1

    @property
    def grader_name(self) -> str:
        return self.grader or ("rllm" if self.template == "paper" else "math-verify")

    def recorded(self, model: str) -> dict:
        """What makes a sample what it is; a resumed run must match it (redi.evaluation.settings)."""
        from redi.evaluation.settings import model_identity

        return {"model": model_identity(model), "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "force_think": self.force_think,
                "system_prompt": self.system_prompt, "template": self.template, "seed": self.seed}


def _hub_rows(spec: str) -> list:
    import datasets

    from redi.hub import hub_unusable

    name = spec[len("hf:"):]
    hub, split = HUB_BENCHMARKS.get(name) or ((name.split("@") + ["test"])[:2])
    why = hub_unusable(hub, "dataset")
    if why:  # fail now rather than after the datasets library's retries
        raise UserError(f"benchmark '{spec}' ({hub}) is not available: {why}; pass a local jsonl/parquet "
                        f"with problem and answer")
    try:
        return list(datasets.load_dataset(hub, split=split))
    except Exception as err:
        raise UserError(f"benchmark '{spec}' ({hub}, split {split}) is not available offline and could not be "
                        f"fetched: {type(err).__name__}; pass a local jsonl/parquet with problem and answer") from None


def _paper_file(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("redi.evaluation").joinpath("benchmarks", PAPER_BENCHMARKS[name])))


def _paper_rows(name: str) -> list:
    return json.loads(_paper_file(name).read_text("utf-8"))


def benchmark_source(spec: str) -> str:
    """Where ``load_benchmark(spec)`` reads from: the file, the shipped copy of a paper benchmark, or the hub."""
    if Path(spec).exists() or spec not in PAPER_BENCHMARKS:
        return spec
    return str(_paper_file(spec))


def load_benchmark(spec: str, limit: int = 0, id_field: str | None = None) -> tuple[str, list[dict]]:
    """(name, [{"id", "problem", "answer"}]) from a shipped benchmark's name, ``hf:<name>`` or a local file.

    ``id_field``: the column holding each problem's id (default: the first of ID_KEYS, else the row index)."""
    path = Path(spec)
    if path.exists():
        from redi.data import iter_rows

        rows = [row for _, row in iter_rows(path)]
        name = path.stem
    elif spec in PAPER_BENCHMARKS:
        rows, name = _paper_rows(spec), spec
    elif spec.startswith("hf:"):
        rows, name = _hub_rows(spec), spec[len("hf:"):].replace("/", "_").split("@")[0]
    else:
        raise UserError(f"benchmark '{spec}' is neither a file nor one of: {', '.join(PAPER_BENCHMARKS)} "
                        "(or hf:<hub dataset>)")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Exception) or not isinstance(row, dict):
            raise UserError(f"{spec} row {i + 1}: not a JSON object")
        problem = next((row[k] for k in PROBLEM_KEYS if row.get(k) is not None), None)
        answer = next((row[k] for k in ANSWER_KEYS if row.get(k) is not None), None)
        if problem is None or answer is None:
            raise UserError(f"{spec} row {i + 1}: needs a problem ({'/'.join(PROBLEM_KEYS)}) and an answer "
                            f"({'/'.join(ANSWER_KEYS)})")
        if id_field is not None and row.get(id_field) is None:
            raise UserError(f"{spec} row {i + 1}: no id in field '{id_field}' (--id-field)")
        problem_id = row[id_field] if id_field else next((row[k] for k in ID_KEYS if row.get(k) is not None), i)
        out.append({"id": problem_id, "problem": problem, "answer": answer})
    return name, out[:limit] if limit else out


def render_prompt(tokenizer: Any, problem: str, s: EvalSettings) -> str:
    user = EVAL_PROMPT.format(Question=problem) if s.template == "paper" else problem
    messages = ([{"role": "system", "content": s.system_prompt}] if s.system_prompt else []) + [
        {"role": "user", "content": user}]
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages) + "\n"
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if s.force_think and not text.endswith("<think>\n"):  # DeepSeek-R1-Distill templates open it themselves
        # rllm's edited template: "<|im_start|>assistant<think>\n", replacing the newline after the role.
        text = (text[:-1] if text.endswith("assistant\n") else text) + "<think>\n"
    return text


def _done(samples_path: Path) -> set[tuple[str, str, int]]:
    if not samples_path.exists():
        return set()
    recover_jsonl(samples_path)  # a kill mid-line: that sample is generated again
    done = set()
    for line in samples_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            done.add((r["benchmark"], str(r["id"]), r["sample"]))
    return done


def _missing_by_count(name: str, problems: list[dict], samples: int, done: set) -> dict[tuple, list[dict]]:
    """Problems grouped by which sample indices they still lack (on a fresh run: one group, all of them)."""
    groups: dict[tuple, list[dict]] = {}
    for p in problems:
        missing = tuple(j for j in range(samples) if (name, str(p["id"]), j) not in done)
        if missing:
            groups.setdefault(missing, []).append(p)
    return groups


# Samples per vLLM call; each call's results are appended (and flushed) before the next starts, so an
# interrupted run loses at most one call. Large enough that vLLM's continuous batching keeps its rows busy.
# The native engine's calls are one batch (--batch-size samples): its samples are written batch by batch.
SAMPLES_PER_CALL = 1024


def samples_per_call(engine: Any, s: EvalSettings) -> int:
    return s.batch_size if getattr(engine, "name", "") == "native" else SAMPLES_PER_CALL


def count_samples(samples_path: Path) -> int:
    """Complete lines in samples.jsonl (what an interrupted run keeps)."""
    try:
        with samples_path.open("rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n") and line.strip())
    except OSError:
        return 0


def generate_samples(engine: Any, name: str, problems: list[dict], s: EvalSettings, samples_path: Path,
                     stop_ids: list[int], progress=None) -> None:
    """Generate the missing (problem, sample) responses and append them to samples.jsonl."""
    groups = _missing_by_count(name, problems, s.samples, _done(samples_path))
    total = sum(len(missing) * len(group) for missing, group in groups.items())
    if not total:
        return
    tokenizer = engine.tokenizer
    task = progress.add_task(f"eval {name}", total=total, info="") if progress else None
    calls = 0
    with samples_path.open("a", encoding="utf-8") as fh:
        for missing, group in groups.items():
            per_call = max(1, samples_per_call(engine, s) // len(missing))
            for start in range(0, len(group), per_call):
                kill_point("eval_call")  # crash tests: what the calls before this one wrote must be there
                chunk = group[start:start + per_call]
                prompts = [tokenizer(render_prompt(tokenizer, p["problem"], s), add_special_tokens=False)["input_ids"]
                           for p in chunk]
                outs = engine.generate(prompts, n=len(missing), temperature=s.temperature, top_p=s.top_p,
                                       max_new_tokens=s.max_new_tokens, seed=s.seed + 100_003 * calls,
                                       stop_token_ids=stop_ids)
                calls += 1
                for p, completions in zip(chunk, outs):
                    for j, c in zip(missing, completions):
                        response = ("<think>\n" if s.force_think else "") + c.text
                        fh.write(json.dumps({"benchmark": name, "id": p["id"], "sample": j, "response": response,
                                             "answer": p["answer"], "finish_reason": c.finish_reason,
                                             "tokens": len(c.token_ids)}) + "\n")
                fh.flush()
                if progress:
                    progress.advance(task, len(chunk) * len(missing))


def grade_samples(samples_path: Path, s: EvalSettings) -> dict[str, dict]:
    """Grade samples.jsonl in place (adds verdicts) and return per-benchmark metrics."""
    from redi.evaluation.advice import missing_think
    from redi.evaluation.grading import grade_many, summarize

    rows = [json.loads(x) for x in samples_path.read_text().splitlines() if x.strip()]
    verdicts = grade_many([r["response"] for r in rows], [r["answer"] for r in rows], workers=s.workers,
                          require_think=s.force_think, grader=s.grader_name)
    results: dict[str, dict] = {}
    by_bench: dict[str, dict] = {}
    for r, v in zip(rows, verdicts):
        r.update(correct=v.correct, format_error=v.format_error, extracted=v.extracted)
        by_bench.setdefault(r["benchmark"], {}).setdefault(str(r["id"]), []).append(r)
    for bench, problems in by_bench.items():
        scores = [[x["correct"] for x in sorted(v, key=lambda x: x["sample"])] for v in problems.values()]
        flat = [x for v in problems.values() for x in v]
        summary = summarize(scores, format_errors=sum(x["format_error"] for x in flat))
        summary["mean_response_tokens"] = sum(x["tokens"] for x in flat) / len(flat)
        summary["truncation_rate"] = sum(x["finish_reason"] == "length" for x in flat) / len(flat)
        summary["grader"] = s.grader_name
        summary["missing_think"] = missing_think([x["response"] for x in flat])  # for redi.evaluation.advice
        results[bench] = summary
    tmp = samples_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(samples_path)
    return results


def evaluate(model: str, benchmarks: list[str], output: str, settings: EvalSettings, backend_name: str = "",
             *, force: bool = False) -> dict:
    from redi.evaluation.engines import check_sampling, make_engine, stop_token_ids
    from redi.evaluation.settings import guard_settings
    from redi.hub import locate
    from redi.model_dir import check_model_folder
    from redi.outputs import refuse_overwriting_inputs
    from redi.training.api import load_tokenizer
    from redi.training.loop import make_progress

    out = Path(output)
    check_sampling(settings.temperature, settings.top_p)
    loaded = [load_benchmark(b, settings.limit) for b in benchmarks]
    refuse_overwriting_inputs([Path(b) for b in benchmarks],
                              [out / name for name in ("samples.jsonl", "results.json", "settings.json")])
    locate(model, "model", "--model")
    check_model_folder(model)  # before guard_settings records it: a bad --model must not claim the folder
    guard_settings(out, settings.recorded(model), force=force)
    model = model_folder(model)  # a .gguf file: its converted HF folder (settings record the file)
    tokenizer = load_tokenizer(model)
    engine = make_engine(settings.engine, model, backend=backend_name, tensor_parallel=settings.tensor_parallel,
                         data_parallel=settings.data_parallel, seed=settings.seed, tokenizer=tokenizer,
                         batch_size=settings.batch_size)
    stops = stop_token_ids(tokenizer, model)
    samples_path = out / "samples.jsonl"
    with make_progress() as progress:
        for name, problems in loaded:
            generate_samples(engine, name, problems, settings, samples_path, stops, progress)
    results = grade_samples(samples_path, settings)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
