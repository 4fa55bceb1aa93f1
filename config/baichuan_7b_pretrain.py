# Baichuan-7B continued pretraining on 1 node x 8 Ascend NPUs, fp16, from the converted released weights.
# Document: seed 000, "Baichuan for PyTorch" (Ascend): 准备环境, 准备数据集, 准备预训练权重, 开始训练. It names the
# script examples/baichuan/pretrain_baichuan_zero_7B.sh and gives none of its values: those below marked "script" are
# that script's in Ascend/AscendSpeed (DeepSpeed 0.9.2 config written by it, Megatron flags).
#
# | value              | document says                          | we use                        | why different
# | devices            | 单机8卡 (1 node x 8)                   | devices=8, dp=8               |
# | precision          | FP16 (基于FP16训练, --fp16)            | float16                       |
# | weights            | LOAD_PATH = converted HF weights       | init_from checkpoints/...     |
# | data               | alpaca-data-conversation.json,         | the same file (prep below)    |
# |                    | preprocess_data.py                     |                               |
# | memory             | > 60 GB free per device                | dry run below                 |
# | ZeRO               | script: stage 2                        | zero_stage=2 (FSDP2)          | FSDP2 shards params
# | fp16 loss scale    | script: DeepSpeed loss_scale 0,        | loss_scale=256 (dynamic),     |
# |                    | initial_scale_power 8, window 1000,    | window 1000, hysteresis 2,    |
# |                    | hysteresis 2, min_loss_scale 1         | min_loss_scale 1              |
# | batch              | script: micro 1, global 8, seq 4096    | the same                      |
# | steps, lr          | script: 1024 iters, lr 1e-5 cosine to  | the same; warmup 102 steps    |
# |                    | 1e-6, --lr-warmup-fraction .1          |                               |
# | optimiser          | script: AdamW 0.9/0.95 eps 1e-8, clip  | the same, weight_decay 0.01   | its DeepSpeed block
# |                    | 1.0; --weight-decay 1e-2 (its DeepSpeed|                               | says 0.0: we take the
# |                    | "optimizer" block says 0.0)            |                               | Megatron flag
# | recompute          | script: --checkpoint-policy block,     | full on the first 30 of 32    |
# |                    | --checkpoint_block_layer 30            | blocks                        |
#
# The document reports no throughput and no loss. Our --dry_run for this mesh (40% MFU of a 910B's 313 TFLOP/s):
# 29.7 GiB per device of 64, 1.53 s/step, 2,671 tokens/s per device.
#
# Data (the document's preprocess_data.py leaves the conversion open; ours: each record in its own alpaca prompt,
# every token counted as in pretraining), or the Megatron .bin/.idx its preprocess_data.py wrote, as they are:
#   python convert.py hf-to-native --src=hf/Baichuan-7B --dst=checkpoints/baichuan-7b
#   python prepare.py --input=alpaca-data-conversation.json --format=alpaca --template=alpaca --train_on_prompt \
#       --tokenizer=checkpoints/baichuan-7b --megatron --out=data/alpaca_conversation_baichuan
#   python prepare.py --input=dataset/alpaca_text_document.bin --format=megatron \
#       --tokenizer=checkpoints/baichuan-7b --out=data/alpaca_conversation_baichuan      # or: Megatron's own files
#   torchrun --nproc_per_node=8 train.py config/baichuan_7b_pretrain.py
#   python train.py config/baichuan_7b_pretrain.py --dry_run
out_dir = "out/baichuan_7b_pretrain"
data_dir = "data/alpaca_conversation_baichuan"
init_from = "checkpoints/baichuan-7b"
model = "baichuan-7b"  # what --dry_run plans with when the checkpoint is not on this machine
devices = 8
dp, tp = 8, 1
zero_stage = 2
activation_checkpointing = "full"
activation_checkpointing_layers = 30
dtype = "float16"
loss_scale = 256.0  # 2^initial_scale_power
loss_scale_window = 1000
loss_scale_hysteresis = 2
min_loss_scale = 1.0
seq_len = 4096
micro_batch_size = 1
global_batch_size = 8
max_iters = 1024
lr = 1e-5
min_lr = 1e-6
warmup_iters = 102  # 10% of 1024
lr_decay_iters = 1024
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 1
log_interval = 1
ckpt_interval = 1000
export = True
