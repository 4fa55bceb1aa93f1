# Tiny twin of config/aquila_7b_pretrain.py: the same code path (aquila family, eps 1e-5, init Normal(0, 0.006) on
# every matrix, float16 with a static loss scale of 8192, ZeRO-2's FSDP2 schedule, AdamW 0.9/0.98 eps 1e-6, weight
# decay 0.1, a constant lr reached by warmup from 1e-6, checkpointing of the first blocks only); a sentencepiece
# tokenizer stands in for Aquila's byte-level BPE, from scratch at CPU size.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python prepare.py --max_chars=300000 --vocab_size=512 --out=data/tiny_text
#   python train.py config/aquila_7b_pretrain_tiny.py
#   python sample.py --ckpt=out/aquila_7b_pretrain_tiny/export --prompt='def ' --max_new_tokens=20
from pathlib import Path as _Path

exec(_Path("config/aquila_7b_pretrain.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/aquila_7b_pretrain_tiny"
data_dir = "data/tiny_text"
init_from = "scratch"
dim, n_layers, n_heads, hidden_dim, max_seq_len = 64, 2, 4, 176, 256  # the tiny preset's sizes, room for chats
seq_len = 64
activation_checkpointing_layers = 1  # the first of 2 blocks, as the recipe's first 26 of 32
