"""The torch backend's S and L against an independent full-logits computation, one sequence at a time."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.backend import MicroBatch  # noqa: E402
from redi.data import Encoder  # noqa: E402

ROWS = [
    ([{"role": "user", "content": "12+345=?"}], [{"role": "assistant", "content": "357\n\\boxed{357}"}]),
    ([{"role": "user", "content": "9+9=?"}], [{"role": "assistant", "content": "I think 18, so \\boxed{18}"}]),
    ([{"role": "user", "content": "a long prompt with words and 123 digits?"}], [{"role": "assistant", "content": "ok"}]),
]


def _seqs(tokenizer):
    enc = Encoder(tokenizer)
    out = []
    for prompt, completion in ROWS:
        p_text, c_text = enc.texts(prompt, completion)
        ids = enc.encode_many([p_text, c_text])
        out.append(enc.finish(ids[0], ids[1], 0))
    return out


def _reference(model_dir, seqs):
    """Independent path: an unpadded forward per sequence, full logits, log_softmax, sum over completion."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sums, lengths = [], []
    for s in seqs:
        ids = torch.tensor(np.concatenate([s.prompt, s.completion]))[None].long()
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        p = len(s.prompt)
        sums.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(p, ids.shape[1])))
        lengths.append(ids.shape[1] - p)
    return np.array(sums), np.array(lengths)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_backend_logps_match_full_logits(tiny_model_dir, tiny_tokenizer, chunk):
    seqs = _seqs(tiny_tokenizer)
    backend = TorchBackend("cpu")
    backend.load(tiny_model_dir, lm_head_chunk=chunk)
    got_s, got_l = backend.sequence_logps(MicroBatch(seqs, 0, 1.0, np.arange(len(seqs))))
    want_s, want_l = _reference(tiny_model_dir, seqs)
    np.testing.assert_array_equal(got_l, want_l)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5, rtol=0)
    # A non-trivial model: log-probs far from uniform, so a masking or RoPE error could not hide.
    assert np.ptp(want_s / want_l) > 0.05


def test_completion_counts_template_suffix_and_eos(tiny_tokenizer):
    seq = _seqs(tiny_tokenizer)[0]
    text = tiny_tokenizer.decode(seq.completion.tolist())
    assert text == "357\n\\boxed{357}<|im_end|>\n<|endoftext|>"
    assert tiny_tokenizer.decode(seq.prompt.tolist()) == "<|im_start|>user\n12+345=?<|im_end|>\n<|im_start|>assistant\n"
    assert int((seq.completion == tiny_tokenizer.eos_token_id).sum()) == 1


def test_gradients_flow_through_chunked_head(tiny_model_dir, tiny_tokenizer):
    seqs = _seqs(tiny_tokenizer)
    grads = []
    for chunk in (2, 4096):
        backend = TorchBackend("cpu")
        backend.load(tiny_model_dir, lm_head_chunk=chunk)
        backend.init_optimizer(weight_decay=0.0)
        backend.forward_backward(MicroBatch(seqs, 0, 1.0, np.arange(3)), lambda ops, s, n: -ops.sum(s / n))
        grads.append(torch.cat([p.grad.flatten() for p in backend.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].norm() > 0
