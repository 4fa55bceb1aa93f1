# Tiny twin of config/baichuan_13b_chat_lora.py: the same code path (ALiBi base, NF4, LoRA rank 8 / alpha 32 on the
# fused W_pack, cosine schedule, baichuan chat template, float16 with loss scaling, adapter dir and merged export), at
# CPU size.
# The tiny tokenizer has no reserved tokens at Baichuan's user/assistant ids 195/196: prepare.py and sample.py
# warn that they are ordinary pieces here, and the run goes on with them.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python train.py config/baichuan_13b_pretrain_tiny.py   # the base: its export
#   python prepare.py --input=chats.jsonl --format=alpaca --template=baichuan \
#       --tokenizer=out/baichuan_13b_pretrain_tiny/export --max_source_len=85 --max_target_len=171 --seq_len=256 \
#       --pack --one_per_row --out=data/tiny_baichuan   # the recipe's 256 + 512 = 768, at a third of it
#   python train.py config/baichuan_13b_chat_lora_tiny.py
#   python sample.py --ckpt=out/baichuan_13b_chat_lora_tiny/export --chat --template=baichuan
from pathlib import Path as _Path

exec(_Path("config/baichuan_13b_chat_lora.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/baichuan_13b_chat_lora_tiny"
data_dir = "data/tiny_baichuan"
init_from = "out/baichuan_13b_pretrain_tiny/export"  # sizes come from the base
seq_len = 256
