# Baichuan2-7B continued pretraining on 8 Ascend NPUs (AscendSpeed), bf16, tensor parallel 8, NormHead.
# Document: seed 001, AscendSpeed "BaiChuan2" README, section Baichuan2-7B (Training, Script 3-6, Performance). It
# names examples/baichuan2/pretrain_baichuan2_ptd_7B.sh; values marked "script" are that script's in
# Ascend/AscendSpeed.
#
# | value              | document says                          | we use                        | why different
# | devices            | 8 x Ascend NPUs                        | devices=8                     |
# | mesh               | weights converted for TP 8, PP 1       | dp=1, tp=8 (sequence parallel)|
# | weights            | Baichuan2-7B-Base, --load ./weight     | init_from checkpoints/...     |
# | data               | tatsu-lab/alpaca train parquet,        | the same (prep below)         |
# |                    | preprocess_data.py -> alpaca_text_doc. |                               |
# | iterations         | 1024 (Performance table)               | max_iters=1024                | the script says 100000
# | global batch       | 5.125 samples/s x 24.97 s/step = 128   | 128                           |
# | sequence           | 2607 tok/s/p x 8 x 24.97 s / 128 ~ 4068| 4096 (script: --seq-length)   |
# | micro batch        | script: 4                              | 4                             |
# | precision          | script: --bf16                         | bfloat16                      |
# | lr                 | script: 1e-6 cosine to 1e-8, no warmup | the same                      |
# | optimiser          | script: Adam 0.9/0.95, wd 1e-2, clip 1 | the same, eps 1e-8 (Megatron) |
# | NormHead, z-loss   | script: --lm-norm-weight, no z-loss    | norm_head (preset), z_loss 0  |
# | recompute          | script: none                           | none                          |
#
# Document's figures (8 NPUs): 2,607 tokens/s per device, 24.97 s/step, 124 TFLOP/s, 5.125 samples/s (reference:
# 3,969 tokens/s per device); the loss: only plots. Our --dry_run, 40% MFU of 313 TFLOP/s: 27.1 GiB per device of 64,
# 25.3 s/step, 2,587 tokens/s per device.
# Compare a run's loss with a reference run (AscendSpeed's criterion: relative error under 2% at every step):
#   python bench.py --plot reference/metrics.jsonl out/baichuan2_7b_pretrain/metrics.jsonl --max_rel_err=0.02
#
# Data: the parquet's "text" column (Megatron preprocess_data.py's default --json-keys text, hence
# alpaca_text_document), every token counted; or the Megatron files the document's command wrote:
#   python convert.py hf-to-native --src=hf/Baichuan2-7B-Base --dst=checkpoints/baichuan2-7b-base
#   python prepare.py --input=train-00000-of-00001-a09b74b3ef9c3b56.parquet --format=parquet --text_field=text \
#       --tokenizer=checkpoints/baichuan2-7b-base --megatron --out=data/alpaca_baichuan2
#   python prepare.py --input=dataset_baichuan2-7B/alpaca_text_document.bin --format=megatron \
#       --tokenizer=checkpoints/baichuan2-7b-base --out=data/alpaca_baichuan2           # or: Megatron's own files
#   torchrun --nproc_per_node=8 train.py config/baichuan2_7b_pretrain.py
#   python train.py config/baichuan2_7b_pretrain.py --dry_run
out_dir = "out/baichuan2_7b_pretrain"
data_dir = "data/alpaca_baichuan2"
init_from = "checkpoints/baichuan2-7b-base"  # raw NormHead rows (norm_head=true): normalised in every forward
model = "baichuan2-7b"
devices = 8
dp, tp = 1, 8
activation_checkpointing = "none"
dtype = "bfloat16"
seq_len = 4096
micro_batch_size = 4
global_batch_size = 128
max_iters = 1024
lr = 1e-6
min_lr = 1e-8
warmup_iters = 0
lr_decay_iters = 1024
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
export = True
