"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end, against transformers
loading the same file (an independent implementation and dequantiser)."""

import subprocess
import sys

import numpy as np
import pytest

import npllama
from npllama.generate import generate
from npllama.weights import default_model_path

QUESTION = "What is the capital of France?"
# transformers 5.24, same GGUF, greedy: the chat-templated question and its answer.
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
            19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]      # "The capital of France is Paris.<|im_end|>"


@pytest.fixture(scope="module")
def model():
    return npllama.load(progress=False)


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, m.eval()


def test_greedy_answer_is_the_one_transformers_gives(model, hf):
    tok, m = hf
    import torch
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    assert ids == CHAT_IDS
    with torch.no_grad():
        ref = m.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    ours = list(generate(model, ids, max_new_tokens=20))
    assert ours == ref == ANSWER_IDS
    assert model.tokenizer.decode(ours[:-1]) == "The capital of France is Paris."


def test_logits_match_transformers(model, hf):
    _, m = hf
    import torch
    ids = np.array([CHAT_IDS])
    with torch.no_grad():
        ref = m(torch.tensor(ids)).logits.numpy()
    ours = model(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    cache = model.new_cache(1)
    stepped = np.concatenate([model(ids[:, :20], cache=cache)] +
                             [model(ids[:, i:i + 1], cache=cache) for i in range(20, ids.shape[1])], axis=1)
    assert np.abs(stepped - ref).max() / np.abs(ref).max() < 1e-4


def test_cli_generate_answers_the_question():
    out = subprocess.run([sys.executable, "-m", "npllama.cli", "generate", "--prompt", QUESTION, "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."
