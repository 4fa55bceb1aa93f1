# Baichuan-13B (ALiBi) continued pretraining on 1 node x 8 Ascend NPUs, fp16, tensor parallel 8 with sequence
# parallelism, from the released Baichuan-13B-Base weights, on the Alpaca parquet's text.
# Not a run of the five documents this project reproduces (see docs/recipes.md): a further published setup.
# Source: Ascend/AscendSpeed (gitee, mirrored on GitHub), master of 2023-12-13: the script
# examples/baichuan/pretrain_baichuan_ptd_13B.sh (commit 85b38dc: its first version's values, 6eb65d6 of 2023-09-28,
# but for --normalization RMSNorm added and --make-vocab-size-divisible-by 8 dropped) and examples/baichuan/README.md
# (commit 24598cc), section Baichuan-13B (训练, 脚本 3-6, 性能); where older READMEs differ, the newest is taken.
# Values marked "Megatron" are the defaults of that commit's ascendspeed/arguments.py, which the script leaves.
#
# | value              | source says                            | we use                        | why different
# | devices, mesh      | NPUS_PER_NODE=8, NNODES=1; TP 8, PP 1, | devices=8, dp=1 x tp=8        |
# |                    | --sequence-parallel, --DDP-impl local  | (sequence-parallel norms)     |
# | hardware           | README: 8 x Ascend NPUs (its version of| device_memory_gib 64          |
# |                    | 2023-10-08, 23e0424: Ascend910 B1 64GB)|                               |
# | weights            | README: Baichuan-13B-Base, converted   | init_from checkpoints/...     |
# |                    | for TP 8; script --load ./weight       |                               |
# | data               | README: tatsu-lab/alpaca train parquet,| the parquet's text column,    | prepare.py ends
# |                    | preprocess_data.py (text column, no    | eos after each record; val 5% | every record with eos
# |                    | --append-eod); --split 949,50,1        | (test 0.1% left in train)     |
# | model              | 40 layers, 5120, ffn 13696, 40 heads,  | preset baichuan-13b (the same)|
# |                    | RMSNorm, --position-embedding-type     |                               |
# |                    | alibi                                  |                               |
# | batch, sequence    | micro 1, global 32, --seq-length 4096  | the same (32 accumulation)    |
# | steps              | --train-iters 100000                   | 100000                        |
# | lr                 | 1e-6 cosine to --min-lr 1e-8; Megatron:| the same                      |
# |                    | no warmup, decay over train-iters      |                               |
# | optimiser          | Adam(W) 0.9/0.95, eps 1e-5, wd 0.1,    | the same                      |
# |                    | clip 1.0                               |                               |
# | fp16 loss scale    | --fp16 --initial-loss-scale 8188.0:    | float16, dynamic from 8188,   | an overflow at 1 stops
# |                    | dynamic; Megatron: window 1000,        | window 1000, hysteresis 2,    | our run (Megatron
# |                    | hysteresis 2, min 1                    | min 1                         | skips on)
# | recompute          | none (no --checkpoint-activations)     | none                          |
# | seed               | 1234                                   | 1234                          |
# | eval, save, log    | every 1000 (10 iters), 1000, 1         | the same                      |
# | loss weighting     | Megatron: each micro batch's mean over | token (the default): every    |
# |                    | its counted targets, then the mean     | target counts, so all micro   |
# |                    | over micro batches and devices         | batches count alike and the   |
# |                    |                                        | two are the same              |
#
# Source's figures (README 性能, 1000 iterations, 8 NPUs): 1,016 tokens/s per device, 16.121 s/step, 88.47 TFLOP/s
# (reference chips: 862 tokens/s per device, 19.852 s/step); the loss: plots only (relative error against the
# reference). Our --dry_run, 40% MFU of 313 TFLOP/s: 31.7 GiB per device of 64, 11.5 s/step, 1,428 tokens/s per device.
#
# Data: the parquet's "text" column (preprocess_data.py's default --json-keys text, hence alpaca_text_document),
# every token counted; or the Megatron files the README's command wrote:
#   python convert.py hf-to-native --src=hf/Baichuan-13B-Base --dst=checkpoints/baichuan-13b-base
#   python prepare.py --input=train-00000-of-00001-a09b74b3ef9c3b56.parquet --format=parquet --text_field=text \
#       --tokenizer=checkpoints/baichuan-13b-base --val_fraction=0.05 --megatron --out=data/alpaca_baichuan13b
#   python prepare.py --input=dataset_baichuan13B/alpaca_text_document.bin --format=megatron \
#       --tokenizer=checkpoints/baichuan-13b-base --val_fraction=0.05 --out=data/alpaca_baichuan13b  # or: Megatron's
#   torchrun --nproc_per_node=8 train.py config/baichuan_13b_pretrain.py
#   python train.py config/baichuan_13b_pretrain.py --dry_run
out_dir = "out/baichuan_13b_pretrain"
data_dir = "data/alpaca_baichuan13b"
init_from = "checkpoints/baichuan-13b-base"
model = "baichuan-13b"  # what --dry_run plans with when the checkpoint is not on this machine
devices = 8
dp, tp = 1, 8
activation_checkpointing = "none"
dtype = "float16"
loss_scale = 8188.0  # --initial-loss-scale, as the script writes it
loss_scale_window = 1000
loss_scale_hysteresis = 2
min_loss_scale = 1.0
seq_len = 4096
micro_batch_size = 1
global_batch_size = 32
loss_weighting = "token"  # every target counts: Megatron's per-micro-batch mean too
max_iters = 100_000
lr = 1e-6
min_lr = 1e-8
warmup_iters = 0
lr_decay_iters = 100_000  # cosine
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
adam_eps = 1e-5
grad_clip = 1.0
seed = 1234
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
