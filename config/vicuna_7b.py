# Vicuna-7B (LLaMA-7B) fine-tuning with FastChat on 1 node x 8 Ascend NPUs, fp16, DeepSpeed ZeRO-1, 3 epochs of
# alpaca-data-conversation in the vicuna template.
# Document: seed 004, "LLaMA-7B/13B for PyTorch" (Ascend ModelZoo, FastChat commit 76f0424): 准备数据集, 获取预训练模型,
# 开始训练 (单机八卡训练（LLaMA-7B）, 7B_finetune.sh), 训练结果展示, 模型推理. The script's values are not in the
# document; those below marked "FastChat" are FastChat's README at that commit (Vicuna: global batch 128, lr 2e-5,
# 3 epochs, max length 2048, weight decay 0; warmup ratio 0.03, cosine, gradient checkpointing) and its train.py
# (vicuna_v1.1 conversations, every example padded to model_max_length, loss on the replies); DeepSpeed's fp16
# defaults (dynamic, 2^16, window 1000, hysteresis 2, min 1) and the HF Trainer's AdamW (0.9/0.999, eps 1e-8, clip 1).
#
# | value              | document says                          | we use                        | why different
# | devices            | 单机8卡                                | devices=8, dp=8               |
# | ZeRO               | zero1 (训练结果展示)                   | zero_stage=1 (FSDP2)          | FSDP2 shards params
# | precision          | --fp16                                 | float16, DeepSpeed defaults   |
# | epochs             | 3                                      | 3: 1219 steps of 128 examples |
# | weights            | Vicuna = LLaMA + delta v1.1 (apply_    | init_from checkpoints/vicuna  |
# |                    | delta)                                 | (convert.py apply-delta)      |
# | data               | alpaca-data-conversation (52,002       | the same, vicuna template,    |
# |                    | conversations), no preprocessing       | one conversation per row      |
# | batch, lr, length  | FastChat: 128, 2e-5 cosine, warmup 3%, | micro 2 x 8 devices x 8 accum,| the split of 128 is
# |                    | 2048, wd 0, gradient checkpointing     | the rest the same             | ours (not given)
# | memory             | > 60 GB free per device                | dry run below                 |
#
# Document's figures (3 epochs): 2,990 tokens/s per device on the NPUs (competitor A 2,452). Our --dry_run, 40% MFU of
# 313 TFLOP/s: 28.0 GiB per device of 64, 11.2 s/step, 2,921 tokens/s per device (padding counted as tokens).
# Chat with the result as its 模型推理 does (fastchat.serve.cli): python sample.py --ckpt=out/vicuna_7b/export --chat
#
#   python convert.py apply-delta --src=hf/llama-7b --delta=hf/vicuna-7b-delta-v1.1 --dst=checkpoints/vicuna-7b
#   python prepare.py --input=playground/data/alpaca-data-conversation.json --format=sharegpt --template=vicuna \
#       --tokenizer=checkpoints/vicuna-7b --seq_len=2048 --pack --one_per_row --out=data/alpaca_conversation_vicuna
#   torchrun --nproc_per_node=8 train.py config/vicuna_7b.py
#   python train.py config/vicuna_7b.py --dry_run
out_dir = "out/vicuna_7b"
data_dir = "data/alpaca_conversation_vicuna"
init_from = "checkpoints/vicuna-7b"
model = "llama-7b"
devices = 8
dp, tp = 8, 1
zero_stage = 1
activation_checkpointing = "full"
dtype = "float16"
loss_scale = 65536.0
loss_scale_window = 1000
loss_scale_hysteresis = 2
min_loss_scale = 1.0
seq_len = 2048
micro_batch_size = 2
global_batch_size = 128
max_iters = 1219  # 3 epochs of 52,002 conversations at 128 a step
lr = 2e-5
min_lr = 0.0
warmup_iters = 37  # 3%
lr_decay_iters = 1219  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
export = True
