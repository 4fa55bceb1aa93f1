# Baichuan2-13B (ALiBi, NormHead) continued pretraining on 2 nodes x 8 Ascend NPUs (AscendSpeed), bf16, on the
# moss-003-sft conversations read as one token stream (the document's "packed_input_ids" data, flash attention on).
# Document: seed 001, AscendSpeed "BaiChuan2" README, section Baichuan2-13B (Training, Script 3-6, Performance,
# Accuracy of the loss). It names examples/baichuan2/pretrain_baichuan2_ptd_13B.sh. In "document says", plain text is
# the document's (its subsection in brackets); "script:" marks that script's values in Ascend/AscendSpeed at master
# 64b1937 (2023-12-14); "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | devices            | 16 x Ascend NPUs [Training]; two-node  | devices=16                    |
# |                    | parallelism [Script 5]                 |                               |
# | mesh               | --tensor-model-parallel-size 8,        | dp=2 x tp=8                   |
# |                    | --pipeline-model-parallel-size 1       |                               |
# |                    | [Script 3]                             |                               |
# | weights            | Baichuan2-13B-Base, LOAD_PATH          | init_from checkpoints/...     | ours is a checkpoint
# |                    | [Script 3, 5]                          | (or ascendspeed-to-native)    | dir
# | data               | moss-003-sft-no-tools.jsonl,           | the same (prep below), every  |
# |                    | MOSSMultiTurnHandler, DATA_PATH        | token counted, not packed     |
# |                    | processed_data_packed_input_ids_doc.   | into rows                     |
# |                    | [Script 4, 5]                          |                               |
# | split              | script: --split 949,50,1 (documents)   | --val_fraction=0.05           | by position there
# | iterations         | total Iterations 1000 [Performance]    | 1000                          |
# | global batch       | script: 256; ours: 5.149 samples/s x   | 256                           |
# |                    | 49.716 s/step = 256 [Performance]      |                               |
# | sequence           | script: --seq-length 4096; ours: 1350  | 4096                          |
# |                    | tok/s/p x 16 x 49.716 s / 256 ~ 4195   |                               |
# | micro batch        | script: 2                              | 2                             |
# | precision          | script: --bf16                         | bfloat16                      |
# | lr                 | script: 2e-5 constant                  | the same                      |
# | optimiser          | script: Adam 0.9/0.98 eps 1e-8, wd 1e-4| the same                      |
# |                    | clip 1.0, distributed optimizer        | (FSDP2 over dp, ZeRO-3 order) |
# | NormHead, z-loss   | script: --lm-norm-weight,              | norm_head (preset), z_loss 0  |
# |                    | --z-loss-weight 0                      |                               |
# | recompute          | script: --auto-recompute-device-size   | none: the plan's peak without |
# |                    | 57344 (recompute only what a 56 GB     | recompute is under 56 GB      |
# |                    | budget needs)                          |                               |
# | loss weighting     | script: each micro batch's mean over   | token (the default): every    |
# |                    | its counted targets, then the mean     | target counts, so all micro   |
# |                    | over micro batches and devices         | batches count alike and the   |
# |                    | (AscendSpeed's loss)                   | two are the same              |
#
# Document's figures (16 NPUs, with FA): 1,350 tokens/s per device, 49.716 s/step, 116.61 TFLOP/s, "5.149
# samples/s/p" (5.149 x 49.716 = 256: per job, not per device); reference 2,062 tokens/s per device. Loss against the
# reference: maximum relative error 0.0266, maximum absolute error 0.0228, and "less than 0.02 throughout" (the two
# disagree; 0.02 is the criterion it states). Our --dry_run, 40% MFU of 313 TFLOP/s: 21.8 GiB per device of 64,
# 46.9 s/step, 1,398 tokens/s per device. Check a run against a reference run:
#   python bench.py --plot reference/metrics.jsonl out/baichuan2_13b_pretrain/metrics.jsonl --max_rel_err=0.02
#
# Data: MOSSMultiTurnHandler renders every turn as Baichuan's 195 + user, 196 + reply without the meta_instruction
# (--drop_system); the pretraining run reads the ids as one stream, so every token counts (--train_on_prompt):
#   python convert.py hf-to-native --src=hf/Baichuan2-13B-Base --dst=checkpoints/baichuan2-13b-base
#   python prepare.py --input=moss-003-sft-no-tools.jsonl --format=moss --template=baichuan2 --drop_system \
#       --train_on_prompt --tokenizer=checkpoints/baichuan2-13b-base --val_fraction=0.05 --megatron \
#       --out=data/moss_baichuan2_stream
#   on each node (node_rank 0 and 1):
#   torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 \
#       train.py config/baichuan2_13b_pretrain.py
#   python train.py config/baichuan2_13b_pretrain.py --dry_run
out_dir = "out/baichuan2_13b_pretrain"
data_dir = "data/moss_baichuan2_stream"
init_from = "checkpoints/baichuan2-13b-base"
model = "baichuan2-13b"
devices = 16
dp, tp = 2, 8
activation_checkpointing = "none"  # under the script's 56 GB budget without recompute
dtype = "bfloat16"
seq_len = 4096
micro_batch_size = 2
global_batch_size = 256
loss_weighting = "token"  # every target counts: the script's per-micro-batch mean too
max_iters = 1000
lr = 2e-5
min_lr = 2e-5  # constant
warmup_iters = 0
lr_decay_iters = 1000
weight_decay = 1e-4
beta1, beta2 = 0.9, 0.98
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
