# Vicuna-13B (LLaMA-13B) fine-tuning with FastChat on 2 nodes x 8 Ascend NPUs, fp16, DeepSpeed ZeRO-2, 3 epochs of
# alpaca-data-conversation in the vicuna template.
# Document: seed 004, "LLaMA-7B/13B for PyTorch" (Ascend ModelZoo, FastChat commit 76f0424): 开始训练 (双机16卡训练
# （LLaMA-13B）, 13B_finetune.sh), 训练结果展示. What it leaves open is filled as in config/vicuna_7b.py (FastChat's README
# and train.py at that commit, DeepSpeed's fp16 defaults, the HF Trainer's AdamW).
#
# | value              | document says                          | we use                        | why different
# | devices            | 双机16卡 (2 nodes x 8)                 | devices=16, dp=16             |
# | ZeRO               | zero2                                  | zero_stage=2 (FSDP2)          | FSDP2 shards params
# | precision, epochs  | --fp16, 3 epochs                       | float16, 1219 steps           |
# | weights            | Vicuna-13B = LLaMA-13B + delta v1.1    | init_from checkpoints/vicuna  |
# | data               | alpaca-data-conversation               | the same, vicuna template     |
# | batch, lr, length  | FastChat: 128, 2e-5 cosine, warmup 3%, | micro 2 x 16 devices x 4      | the split of 128 is
# |                    | 2048, wd 0, gradient checkpointing     | accum, the rest the same      | ours (not given)
#
# Document's figures: 1,498 tokens/s per device on the NPUs (competitor A 1,386). Our --dry_run, 40% MFU of
# 313 TFLOP/s: 40.6 GiB per device of 64, 10.8 s/step, 1,524 tokens/s per device (padding counted as tokens).
#
#   python convert.py apply-delta --src=hf/llama-13b --delta=hf/vicuna-13b-delta-v1.1 --dst=checkpoints/vicuna-13b
#   python prepare.py --input=playground/data/alpaca-data-conversation.json --format=sharegpt --template=vicuna \
#       --tokenizer=checkpoints/vicuna-13b --seq_len=2048 --pack --one_per_row --out=data/alpaca_conversation_vicuna
#   on each node: torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER \
#       --master_port=29500 train.py config/vicuna_13b.py
#   python train.py config/vicuna_13b.py --dry_run
out_dir = "out/vicuna_13b"
data_dir = "data/alpaca_conversation_vicuna"
init_from = "checkpoints/vicuna-13b"
model = "llama-13b"
devices = 16
dp, tp = 16, 1
zero_stage = 2
activation_checkpointing = "full"
dtype = "float16"
loss_scale = 65536.0
loss_scale_window = 1000
loss_scale_hysteresis = 2
min_loss_scale = 1.0
seq_len = 2048
micro_batch_size = 2
global_batch_size = 128
max_iters = 1219
lr = 2e-5
min_lr = 0.0
warmup_iters = 37
lr_decay_iters = 1219
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
export = True
