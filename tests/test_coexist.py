"""kernels.py beside Hugging Face's `kernels` package (imported by transformers >= 5.25 under the same name): one
process started in the project root imports this project and transformers, in either order, and runs both models.

Each case runs in a fresh interpreter, so the order the suite itself imported things in cannot hide a failure."""

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = r"""
import sys, json, tempfile, pathlib
if sys.argv[1] == "ours-first":
    import model, kernels
    from transformers import AutoModelForCausalLM, AutoTokenizer
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import model, kernels
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import convert

tmp = pathlib.Path(tempfile.mkdtemp())
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LlamaForCausalLM(config).save_pretrained(tmp / "hf")
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate("abcdefghij")}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(tmp / "hf")

hf = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
ids = AutoTokenizer.from_pretrained(tmp / "hf")("abcabj", return_tensors="pt").input_ids
convert.main(["hf-to-native", "--src", str(tmp / "hf"), "--dst", str(tmp / "ckpt")])
ours = model.Transformer.from_checkpoint(tmp / "ckpt").eval()
with torch.no_grad():
    a, b = hf(ids).logits, ours(ids)[0]
x = torch.randn(3, 32)
print(json.dumps({"tokens": ids.shape[1], "max_diff": (a - b).abs().max().item(),
                  "our_kernels": kernels.__file__, "rms_norm_ok": torch.allclose(
                      kernels.rms_norm(x, torch.ones(32), 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
                      atol=1e-6)}))
"""


@pytest.mark.parametrize("order", ["ours-first", "transformers-first"])
def test_project_and_transformers_in_one_process(order):
    out = subprocess.run([sys.executable, "-c", SCRIPT, order], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 6
    assert result["max_diff"] < 1e-5
    assert result["our_kernels"].startswith(ROOT) and result["rms_norm_ok"]


def test_hugging_face_names_are_theirs_and_ours_are_ours():
    """With the package installed (transformers 5.25 requires it), its names reach transformers; ours win on ours."""
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-c", "import kernels, transformers.integrations.hub_kernels as h; "
                          "print(kernels.Mode.__module__, kernels.rms_norm.__module__, "
                          "h.is_kernels_available())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    mode_module, rms_module, available = out.stdout.split()
    assert mode_module.startswith("kernels._internals") and rms_module == "kernels" and available == "True"
