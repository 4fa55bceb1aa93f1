# Tiny twin of config/baichuan2_13b_sft.py: the same code path (baichuan2, ALiBi with padding-aware document masks,
# NormHead; multi-turn chats in the baichuan2 template; bfloat16, no activation checkpointing), at CPU size.
# The tiny tokenizer has no reserved tokens at Baichuan's user/assistant ids 195/196: prepare.py and sample.py
# warn that they are ordinary pieces here, and the run goes on with them.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python train.py config/baichuan2_13b_pretrain_tiny.py   # the base: its export
#   python prepare.py --input=chats.jsonl --format=sharegpt --template=baichuan2 \
#       --tokenizer=out/baichuan2_13b_pretrain_tiny/export --seq_len=256 --pack --one_per_row \
#       --out=data/tiny_baichuan2
#   python train.py config/baichuan2_13b_sft_tiny.py
#   python sample.py --ckpt=out/baichuan2_13b_sft_tiny/export --chat --template=baichuan2
from pathlib import Path as _Path

exec(_Path("config/baichuan2_13b_sft.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/baichuan2_13b_sft_tiny"
data_dir = "data/tiny_baichuan2"
init_from = "out/baichuan2_13b_pretrain_tiny/export"  # sizes come from the base
seq_len = 256
