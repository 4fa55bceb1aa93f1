# Tiny twin of config/baichuan_7b_qlora.py: the same code path (NF4 base, LoRA rank 8 / alpha 16 / dropout 0.05 on
# W_pack and every other linear but the head, Human/Assistant template on Belle-format records, bfloat16, full
# activation checkpointing, linear lr decay, adapter dir and merged export), at CPU size.
# tests/test_recipes.py runs it end to end (prepare -> train -> export -> sample). From the repo root:
#   python train.py config/baichuan_7b_pretrain_tiny.py   # the base: its export
#   python prepare.py --input=chats.jsonl --format=belle --template=human-assistant \
#       --tokenizer=out/baichuan_7b_pretrain_tiny/export --seq_len=256 --pack --out=data/tiny_human-assistant
#   python train.py config/baichuan_7b_qlora_tiny.py
#   python sample.py --ckpt=out/baichuan_7b_qlora_tiny/export --chat --template=human-assistant
from pathlib import Path as _Path

exec(_Path("config/baichuan_7b_qlora.py").read_text())  # the full recipe (paths from the repo root)
exec(_Path("config/_twin.py").read_text())  # CPU scale, then:
out_dir = "out/baichuan_7b_qlora_tiny"
data_dir = "data/tiny_human-assistant"
init_from = "out/baichuan_7b_pretrain_tiny/export"  # sizes come from the base
seq_len = 256
