"""``compile``: the setting's parsing, the fall-back to eager when compiling fails (a real compiler failure,
not a stand-in), and compiled layers under torchrun + FSDP2 (gloo, one rank) giving the eager losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.config import apply_overrides, load_config, validate
from redi.option_checks import compile_mode  # noqa: E402
from redi.errors import UserError  # noqa: E402
from redi.training.api import train  # noqa: E402

from test_distributed import TINY, _free_port, _losses, _overrides  # noqa: E402


def test_compile_setting_parsed_once_for_every_spelling(tmp_path):
    assert [compile_mode(v) for v in (False, True, "auto", " TRUE ", "False")] == ["false", "true", "auto", "true", "false"]
    with pytest.raises(UserError, match="config key 'compile' must be false, true or auto, got 'sometimes'"):
        validate(apply_overrides(load_config(None), ["compile=sometimes"]))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("compile: true\n")  # a YAML boolean
    assert compile_mode(validate(load_config(yaml_file)).compile) == "true"
    # auto compiles on CUDA only (where it was measured); true compiles on every device.
    assert not TorchBackend("cpu", compile="auto").compile_requested
    assert TorchBackend("cpu", compile=True).compile_requested
    assert not TorchBackend("cpu").compile_requested


FALLBACK = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from redi.backend import MicroBatch
    from redi.backends.torch_cuda import layers
    from redi.backends.torch_cuda.backend import TorchBackend
    from redi.data import TokenizedSeq
    from redi.objectives import make_objective
    from redi.training.loop import StageRun, micro_batch_loss

    rng = np.random.default_rng(0)
    def seq(n, m):
        return TokenizedSeq(rng.integers(3, 60, n).astype(np.int32), rng.integers(3, 60, m).astype(np.int32))
    batch = MicroBatch([seq(5, 9), seq(4, 12), seq(5, 7), seq(4, 6)], 2, 1.0, np.arange(2))
    run = StageRun("pairs", None, [], make_objective("redi"), 0)
    grads, flags = [], []
    for mode in ("false", "true"):
        backend = TorchBackend("cpu", compile=mode, activation_checkpointing="1")
        backend.load(sys.argv[1], lm_head_chunk=7)
        backend.init_optimizer(weight_decay=0.0)
        for _ in range(2):  # the second step must not warn again
            backend.model.zero_grad(set_to_none=True)
            backend.forward_backward(batch, micro_batch_loss(run, batch))
        flags.append([backend.compile_requested, layers.compiled(backend.layers)])
        grads.append(torch.cat([p.grad.flatten() for p in backend.model.parameters() if p.grad is not None]))
    print("RESULT", json.dumps({"flags": flags, "max_diff": float((grads[0] - grads[1]).abs().max())}))
""")


def test_failing_compiler_falls_back_to_eager_with_one_warning_line(tmp_path, tiny_model_dir):
    """Inductor with no working C++ compiler (CXX names none) fails for real at the first compiled call: the
    step still runs, eagerly, with one warning line, and gives the eager gradients."""
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("REDI_COMPILE_BACKEND", None)
    proc = subprocess.run([sys.executable, str(script), tiny_model_dir], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "torch.compile" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert warnings[0].startswith("warning: torch.compile of the decoder layers failed (")
    assert "C++ compiler" in warnings[0] and warnings[0].endswith("training continues eagerly")
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["flags"] == [[False, False], [True, False]]  # asked for, then fell back
    assert result["max_diff"] == 0.0  # the eager path, bit for bit


def test_unknown_compile_backend_falls_back_at_install(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("REDI_COMPILE_BACKEND", "no_such_backend")
    backend = TorchBackend("cpu", compile=True)
    backend.load(tiny_model_dir, lm_head_chunk=7)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "InvalidBackend" in err[0] and err[0].endswith("training continues eagerly")
    from redi.backends.torch_cuda import layers

    assert not layers.compiled(backend.layers)


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from redi.backends.torch_cuda import layers
    from redi.backends.torch_cuda.backend import TorchBackend
    from redi.backend import backend_options
    from redi.config import apply_overrides, load_config
    from redi.training.api import train
    cfg = apply_overrides(load_config(sys.argv[1]), sys.argv[2:])
    backend = TorchBackend("cpu", cfg.seed, **backend_options(cfg, "cpu"))  # the options route train() uses
    train(cfg, backend=backend)
    print("RESULT", json.dumps({"world": backend.world_size, "sharded": backend.dist.enabled,
                                "layer_class": type(backend.layers[0]).__name__, "compiled": layers.compiled(backend.layers)}))
""")


@pytest.mark.slow  # ~1-2 min on a busy 2-core box: torchrun start, dynamo tracing under FSDP2
def test_torchrun_one_rank_fsdp2_compiled_matches_eager(tmp_path, tiny_model_dir):
    """``torchrun --nproc-per-node 1`` (gloo, FSDP2 fully_shard) with ``compile=true`` and checkpointed layers:
    dynamo traces the wrapped layers (aot_eager backend: the graph inductor would get, without C++) and the
    losses equal a one-process eager run's over 3 steps."""
    eager = tmp_path / "eager"
    steps = ["pairs.max_steps=3"]
    train(apply_overrides(load_config(TINY), _overrides(tiny_model_dir, eager, "pairs") + steps))
    compiled = tmp_path / "compiled"
    script = tmp_path / "run.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "REDI_COMPILE_BACKEND": "aot_eager"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(_free_port()),
           str(script), str(TINY), *_overrides(tiny_model_dir, compiled, "pairs"), *steps,
           "compile=true", "activation_checkpointing=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "training continues eagerly" not in proc.stderr
    rank = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert rank == {"world": 1, "sharded": True, "layer_class": "FSDPQwen2DecoderLayer", "compiled": True}
    l_eager, l_compiled = _losses(eager), _losses(compiled)
    assert len(l_eager) == len(l_compiled) == 3
    np.testing.assert_allclose(l_compiled, l_eager, atol=1e-5, rtol=0)
    assert l_eager[-1] != l_eager[0]
    assert Path(compiled / "final" / "model.safetensors").exists()


def test_lm_head_kernel_falls_back_with_one_warning_line(capsys):
    """The LM-head kernels' own fall-back (CUDA compiles them always): inductor with no C++ compiler fails for
    real; the call returns the eager result and the next call goes straight to eager, without a new warning."""
    from torch._inductor import config as inductor_config

    from redi.backends.torch_cuda import logprobs

    def scaled_lse(x):
        return torch.logsumexp(x * 2.0, dim=-1)

    x = torch.randn(4, 7)
    call = logprobs._kernel("test-only scaled_lse", scaled_lse)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        got = call(x)
        again = call(x)
    torch.testing.assert_close(got, scaled_lse(x), rtol=0, atol=0)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: torch.compile of the LM-head test-only scaled_lse failed (")
    assert logprobs._KERNELS.pop("test-only scaled_lse") is scaled_lse
