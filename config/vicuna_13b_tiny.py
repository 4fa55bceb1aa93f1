# Tiny twin of config/vicuna_13b.py: the same code path (llama, multi-turn sharegpt chats in the vicuna v1.1 template,
# packed rows, float16 with DeepSpeed's dynamic loss scaling, ZeRO-2's settings in one
# process, full activation checkpointing), at CPU size.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python prepare.py && python train.py config/default.py   # a llama-family base
#   python prepare.py --input=chats.jsonl --format=sharegpt --template=vicuna \
#       --tokenizer=out/default/export --seq_len=256 --pack --out=data/tiny_vicuna
#   python train.py config/vicuna_13b_tiny.py
#   python sample.py --ckpt=out/vicuna_13b_tiny/export --chat --template=vicuna
from pathlib import Path as _Path

exec(_Path("config/vicuna_13b.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/vicuna_13b_tiny"
data_dir = "data/tiny_vicuna"
init_from = "out/default/export"  # sizes come from the base
seq_len = 256
