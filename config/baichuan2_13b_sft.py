# Baichuan2-13B (ALiBi) multi-turn fine-tuning on moss-003-sft, 2 nodes x 8 Ascend NPUs (AscendSpeed), bf16: the
# instruction dataset with a padding attention mask and without flash attention, as the document's fine-tuning.
# Document: seed 001, AscendSpeed "BaiChuan2" README, section Baichuan2-13B, Script 4-5 ("If you need to fine-tune
# the training model ... --is-instruction-dataset ... --padding-attention-mask"). Everything else is the 13B
# pretraining script's (examples/baichuan2/pretrain_baichuan2_ptd_13B.sh in Ascend/AscendSpeed), as the document
# says to append these arguments to it. In "document says", plain text is the document's (its subsection in
# brackets); "script:" marks that script's values in Ascend/AscendSpeed at master 64b1937 (2023-12-14).
#
# | value              | document says                          | we use                        | why different
# | devices, mesh      | 16 x Ascend NPUs [Training]; two-node  | devices=16, dp=2 x tp=8       |
# |                    | parallelism; TP 8 weights [Script 3, 5]|                               |
# | weights            | Baichuan2-13B-Base, LOAD_PATH          | init_from checkpoints/...     |
# |                    | [Script 3, 5]                          |                               |
# | data               | moss-003-sft-no-tools.jsonl,           | the same: 195/196 turns, loss |
# |                    | MOSSMultiTurnHandler,                  | on the replies, one           |
# |                    | --is-instruction-dataset [Script 4, 5] | conversation per row          |
# | split              | script: --split 949,50,1               | --val_fraction=0.05           | by position there
# | attention mask     | --padding-attention-mask, FA off (FA   | per-row document mask (ALiBi  | the same masking;
# |                    | cannot take ALiBi's padding mask)      | bias + mask, fused op on NPU) | ours takes the FA op
# |                    | [Script 5]                             |                               |
# | batch, seq, steps  | script: micro 2, global 256, 4096,     | the same                      |
# |                    | 1000 iterations                        |                               |
# | lr, optimiser      | script: 2e-5 constant, Adam 0.9/0.98,  | the same                      |
# |                    | eps 1e-8, wd 1e-4, clip 1.0, bf16      |                               |
# | recompute          | script: budget 57344 MB                | none (the plan fits under it) |
# | loss weighting     | script: each micro batch's mean over   | micro_batch: the same         |
# |                    | its counted targets, then the mean     |                               |
# |                    | over micro batches and devices         |                               |
# |                    | (AscendSpeed's loss), over the replies |                               |
# |                    | with --is-instruction-dataset          |                               |
#
# The document gives no figures for this run (its Performance table is the FA pretraining run). Our --dry_run, 40%
# MFU of 313 TFLOP/s: 21.8 GiB per device of 64 before the data is here (its padding masks then add to it), 46.9 s/step,
# 1,398 tokens/s per device, padding counted as tokens.
#
#   python convert.py hf-to-native --src=hf/Baichuan2-13B-Base --dst=checkpoints/baichuan2-13b-base
#   python prepare.py --input=moss-003-sft-no-tools.jsonl --format=moss --template=baichuan2 --drop_system \
#       --tokenizer=checkpoints/baichuan2-13b-base --seq_len=4096 --pack --one_per_row --val_fraction=0.05 \
#       --out=data/moss_baichuan2
#   on each node: torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER \
#       --master_port=29500 train.py config/baichuan2_13b_sft.py
#   python train.py config/baichuan2_13b_sft.py --dry_run
out_dir = "out/baichuan2_13b_sft"
data_dir = "data/moss_baichuan2"
init_from = "checkpoints/baichuan2-13b-base"
model = "baichuan2-13b"
devices = 16
dp, tp = 2, 8
activation_checkpointing = "none"  # under the script's 56 GB budget without recompute
dtype = "bfloat16"
seq_len = 4096
micro_batch_size = 2
global_batch_size = 256
loss_weighting = "micro_batch"  # the script's (Megatron), to reproduce its run: short replies weigh more
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
