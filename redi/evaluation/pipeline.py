"""`redi eval`: the paper's evaluation protocol (redi-spec.md §5) on any backend.

Prompt: the paper's evaluation instruction inside the model's chat template, with the Qwen-Math system
prompt, and the generation forced to open with ``<think>`` as rllm did (``<|im_start|>assistant<think>\\n``:
no newline before ``<think>``). Sampling: T 0.6, top-p 0.95, 16 samples. Grading: redi.evaluation.grading (the last
``\\boxed{}`` after ``</think>``; an unclosed think block scores 0). Samples are appended to
``samples.jsonl`` as they are generated, so an interrupted run resumes without regenerating them, and the
file is directly gradeable by ``redi grade``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redi.errors import UserError

EVAL_PROMPT = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think step "
    "by step before answering.\n\n{Question}"
)
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# name -> (hub dataset, split). Field names differ between uploads; problem/answer columns are detected.
BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "amc23": ("math-ai/amc23", "test"),
    "minerva": ("math-ai/minervamath", "test"),
    "olympiadbench": ("math-ai/olympiadbench", "test"),
}
PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "gold")


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
    batch_size: int = 64
    workers: int | None = None
    limit: int = 0


def load_benchmark(spec: str, limit: int = 0, id_field: str | None = None) -> tuple[str, list[dict]]:
    """(name, [{"id", "problem", "answer"}]) from a benchmark name or a local jsonl/parquet file.

    ``id_field``: the column that holds each problem's id (default: id, else unique_id, else the row index)."""
    path = Path(spec)
    if path.exists():
        from redi.data import iter_rows

        rows = [row for _, row in iter_rows(path)]
        name = path.stem
    elif spec in BENCHMARKS:
        import datasets

        hub, split = BENCHMARKS[spec]
        try:
            rows = list(datasets.load_dataset(hub, split=split))
        except Exception as err:
            raise UserError(f"benchmark '{spec}' ({hub}) is not available offline and could not be fetched: "
                            f"{type(err).__name__}; pass a local jsonl/parquet with problem and answer") from None
        name = spec
    else:
        raise UserError(f"benchmark '{spec}' is neither a file nor one of: {', '.join(BENCHMARKS)}")
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
        pid = row[id_field] if id_field is not None else row.get("id", row.get("unique_id", i))
        out.append({"id": pid, "problem": problem, "answer": answer})
    return name, out[:limit] if limit else out


def render_prompt(tokenizer: Any, problem: str, s: EvalSettings) -> str:
    user = EVAL_PROMPT.format(Question=problem) if s.template == "paper" else problem
    messages = ([{"role": "system", "content": s.system_prompt}] if s.system_prompt else []) + [
        {"role": "user", "content": user}]
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages) + "\n"
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if s.force_think:
        # rllm's edited template: "<|im_start|>assistant<think>\n", replacing the newline after the role.
        text = (text[:-1] if text.endswith("assistant\n") else text) + "<think>\n"
    return text


def _done(samples_path: Path) -> set[tuple[str, str, int]]:
    if not samples_path.exists():
        return set()
    done = set()
    for line in samples_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            done.add((r["benchmark"], str(r["id"]), r["sample"]))
    return done


def generate_samples(backend: Any, tokenizer: Any, name: str, problems: list[dict], s: EvalSettings,
                     samples_path: Path, progress=None) -> None:
    """Generate the missing (problem, sample) responses and append them to samples.jsonl."""
    done = _done(samples_path)
    todo = [(p, j) for j in range(s.samples) for p in problems if (name, str(p["id"]), j) not in done]
    if not todo:
        return
    prompts = {str(p["id"]): tokenizer(render_prompt(tokenizer, p["problem"], s), add_special_tokens=False)["input_ids"]
               for p in problems}
    eos = tokenizer.eos_token_id
    stop_ids = {eos} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tokenizer.get_vocab()}
    task = progress.add_task(f"eval {name}", total=len(todo), info="") if progress else None
    with samples_path.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), s.batch_size):
            chunk = todo[start:start + s.batch_size]
            outs = backend.generate([prompts[str(p["id"])] for p, _ in chunk], max_new_tokens=s.max_new_tokens,
                                    temperature=s.temperature, top_p=s.top_p, seed=s.seed + start, eos_id=eos)
            for (p, j), ids in zip(chunk, outs):
                stopped = bool(ids) and ids[-1] in stop_ids
                text = tokenizer.decode(ids, skip_special_tokens=True)
                response = ("<think>\n" if s.force_think else "") + text
                fh.write(json.dumps({"benchmark": name, "id": p["id"], "sample": j, "response": response,
                                     "answer": p["answer"], "finish_reason": "stop" if stopped else "length",
                                     "tokens": len(ids)}) + "\n")
            fh.flush()
            if progress:
                progress.advance(task, len(chunk))


def grade_samples(samples_path: Path, s: EvalSettings) -> dict[str, dict]:
    """Grade samples.jsonl in place (adds verdicts) and return per-benchmark metrics."""
    from redi.evaluation.grading import grade_many, summarize

    rows = [json.loads(x) for x in samples_path.read_text().splitlines() if x.strip()]
    verdicts = grade_many([r["response"] for r in rows], [r["answer"] for r in rows], workers=s.workers,
                          require_think=s.force_think)
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
        results[bench] = summary
    tmp = samples_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(samples_path)
    return results


def evaluate(model: str, benchmarks: list[str], output: str, settings: EvalSettings, backend_name: str = "") -> dict:
    from redi.training.api import load_tokenizer
    from redi.backend import make_backend
    from redi.training.loop import make_progress

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    loaded = [load_benchmark(b, settings.limit) for b in benchmarks]
    backend = make_backend(backend_name, settings.seed)
    backend.load(model, precision="auto", lm_head_chunk=1024)
    samples_path = out / "samples.jsonl"
    with make_progress() as progress:
        for name, problems in loaded:
            generate_samples(backend, tokenizer, name, problems, settings, samples_path, progress)
    results = grade_samples(samples_path, settings)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
