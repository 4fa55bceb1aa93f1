# Tiny twin of config/llama_7b_alpaca.py: the same code path (llama, alpaca template and format, one example per
# padded row, bfloat16, FSDP full_shard's settings in one process, no activation checkpointing), at CPU size.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python prepare.py && python train.py config/default.py   # a llama-family base
#   python prepare.py --input=chats.jsonl --format=alpaca --template=alpaca \
#       --tokenizer=out/default/export --seq_len=256 --pack --one_per_row \
#       --out=data/tiny_alpaca
#   python train.py config/llama_7b_alpaca_tiny.py
#   python sample.py --ckpt=out/llama_7b_alpaca_tiny/export --chat --template=alpaca
from pathlib import Path as _Path

exec(_Path("config/llama_7b_alpaca.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/llama_7b_alpaca_tiny"
data_dir = "data/tiny_alpaca"
init_from = "out/default/export"  # sizes come from the base
seq_len = 256
