# Tiny twin of config/baichuan2_13b_pretrain.py: the same code path (baichuan2 family, ALiBi, NormHead, bfloat16,
# no activation checkpointing), from scratch, in one process instead of 2 x 8, at CPU size.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python prepare.py --max_chars=300000 --vocab_size=512 --out=data/tiny_text
#   python train.py config/baichuan2_13b_pretrain_tiny.py
#   python sample.py --ckpt=out/baichuan2_13b_pretrain_tiny/export --prompt='def ' --max_new_tokens=20
from pathlib import Path as _Path

exec(_Path("config/baichuan2_13b_pretrain.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/baichuan2_13b_pretrain_tiny"
data_dir = "data/tiny_text"
init_from = "scratch"
dim, n_layers, n_heads, hidden_dim, max_seq_len = 64, 2, 4, 176, 256  # the tiny preset's sizes, room for chats
seq_len = 64
