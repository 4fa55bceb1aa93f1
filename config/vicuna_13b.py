# Vicuna-13B (LLaMA-13B) fine-tuning with FastChat on 2 nodes x 8 Ascend NPUs, fp16, DeepSpeed ZeRO-2, 3 epochs of
# alpaca-data-conversation in the vicuna template.
# Document: seed 004, "LLaMA-7B/13B for PyTorch" (Ascend ModelZoo, FastChat commit 76f0424): 开始训练 (双机16卡训练
# （LLaMA-13B）, 13B_finetune.sh), 训练结果展示, 模型推理. What it leaves open is filled as in config/vicuna_7b.py, with
# the same markers in "document says": plain text the document's (its section in brackets), "FastChat:" FastChat's
# README and train.py at that commit, "DeepSpeed:" its fp16 defaults, "HF Trainer:" the Trainer's AdamW, "ours:" our
# reading.
#
# | value              | document says                          | we use                        | why different
# | devices            | 双机16卡 (2 nodes x 8) [开始训练]      | devices=16, dp=16             |
# | ZeRO               | zero2 [训练结果展示]                   | zero_stage=2 (FSDP2)          | FSDP2 shards params
# | precision, epochs  | --fp16 [开始训练]; 3 epochs            | float16, 1215 steps (3 x 405) | ours: as vicuna_7b
# |                    | [训练结果展示]                         |                               |
# | weights            | Vicuna-13B = LLaMA-13B + delta v1.1    | init_from checkpoints/vicuna  |
# |                    | [获取预训练模型]                       |                               |
# | data               | alpaca-data-conversation [准备数据集]  | the same, vicuna template;    | ours: train.py needs a
# |                    | FastChat: every conversation trained   | 0.1% held out                 | val split
# | batch, lr, length  | FastChat: 128, 2e-5 cosine, warmup 3%, | micro 2 x 16 devices x 4      | ours: the split of
# |                    | 2048, wd 0, gradient checkpointing     | accum, the rest the same      | 128 (not given)
# | inference memory   | 推理13B模型大约需要28GB显存 (one NPU)  | sample.py: 25.8 GiB = 27.7 GB | the same size
# |                    | [模型推理]                             | (fp16 weights + a 2048-token  |
# |                    |                                        | KV cache, its check_memory)   |
# | loss weighting     | HF Trainer: each micro batch's mean    | micro_batch: the same         |
# |                    | over its counted targets, then the     |                               |
# |                    | mean over micro batches and devices    |                               |
# |                    | (FastChat trains with it)              |                               |
#
# Document's figures [训练结果展示]: 1,498 tokens/s per device on the NPUs (competitor A 1,386). Our --dry_run, 40% MFU
# of 313 TFLOP/s: 40.6 GiB per device of 64, 10.8 s/step, 1,524 tokens/s per device (padding counted as tokens).
# Chat with the result on one device as its 模型推理 does: python sample.py --ckpt=out/vicuna_13b/export --chat
# --dtype=float16
#
#   python convert.py apply-delta --src=hf/llama-13b --delta=hf/vicuna-13b-delta-v1.1 --dst=checkpoints/vicuna-13b
#   python prepare.py --input=playground/data/alpaca-data-conversation.json --format=sharegpt --template=vicuna \
#       --tokenizer=checkpoints/vicuna-13b --seq_len=2048 --pack --one_per_row --val_fraction=0.001 \
#       --out=data/alpaca_conversation_vicuna
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
loss_weighting = "micro_batch"  # the 2023 HF Trainer's, to reproduce the run: short replies weigh more
max_iters = 1215  # 3 epochs of 405 steps (as vicuna_7b)
lr = 2e-5
min_lr = 0.0
warmup_iters = 37
lr_decay_iters = 1215
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
keep_last = 2  # our choice (the document names --save_total_limit, not its value)
export = True
