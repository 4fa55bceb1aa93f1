# Vicuna-7B (LLaMA-7B) fine-tuning with FastChat on 1 node x 8 Ascend NPUs, fp16, DeepSpeed ZeRO-1, 3 epochs of
# alpaca-data-conversation in the vicuna template.
# Document: seed 004, "LLaMA-7B/13B for PyTorch" (Ascend ModelZoo, FastChat commit 76f0424): 准备数据集, 获取预训练模型,
# 开始训练 (单机八卡训练（LLaMA-7B）, 7B_finetune.sh), 训练结果展示, 模型推理. The script's values are not in the
# document. In "document says", plain text is the document's (its section in brackets); "FastChat:" FastChat at that
# commit, its README (Vicuna: global batch 128, lr 2e-5, 3 epochs, max length 2048, weight decay 0; warmup ratio 0.03,
# cosine, gradient checkpointing) and fastchat/train/train.py (vicuna_v1.1 conversations, every example padded to
# model_max_length, loss on the replies, every conversation trained: eval_dataset=None); "DeepSpeed:" its fp16
# defaults (dynamic, 2^16, window 1000, hysteresis 2, min 1); "HF Trainer:" the Trainer's AdamW (0.9/0.999, eps 1e-8,
# clip 1); "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | devices            | 单机8卡 [开始训练]                     | devices=8, dp=8               |
# | ZeRO               | zero1 [训练结果展示]                   | zero_stage=1 (FSDP2)          | FSDP2 shards params
# | precision          | --fp16 [开始训练]; DeepSpeed: defaults | float16, DeepSpeed's defaults |
# | epochs             | 3 [训练结果展示]                       | 3: 1215 steps of 128 examples | ours: 405 whole steps
# |                    |                                        |                               | an epoch of the
# |                    |                                        |                               | 51,950 trained
# | weights            | Vicuna = LLaMA + delta v1.1, apply_    | init_from checkpoints/vicuna  |
# |                    | delta [获取预训练模型]                 | (convert.py apply-delta)      |
# | data               | alpaca-data-conversation, no           | the same, vicuna template,    |
# |                    | preprocessing [准备数据集]; ours:      | one conversation per row      |
# |                    | 52,002 conversations (alpaca_data's    |                               |
# |                    | records)                               |                               |
# | held out           | FastChat: none (eval_dataset=None)     | 0.1%: 52 conversations        | ours: train.py needs a
# |                    |                                        |                               | val split
# | batch, lr, length  | FastChat: 128, 2e-5 cosine, warmup 3%, | micro 2 x 8 devices x 8 accum,| ours: the split of
# |                    | 2048, wd 0, gradient checkpointing     | the rest the same             | 128 (not given)
# | optimiser          | HF Trainer: AdamW 0.9/0.999, eps 1e-8, | the same                      |
# |                    | clip 1.0                               |                               |
# | training memory    | 每张卡有60G以上空闲内存 [准备环境]     | dry run below                 |
# | inference memory   | 推理7B模型大约需要14G显存 (one NPU)    | sample.py: 13.6 GiB = 14.6 GB | the same size
# |                    | [模型推理]                             | (fp16 weights + a 2048-token  |
# |                    |                                        | KV cache, its check_memory)   |
# | loss weighting     | HF Trainer: each micro batch's mean    | micro_batch: the same         |
# |                    | over its counted targets, then the     |                               |
# |                    | mean over micro batches and devices    |                               |
# |                    | (FastChat trains with it)              |                               |
#
# Document's figures [训练结果展示] (3 epochs): 2,990 tokens/s per device on the NPUs (competitor A 2,452). Our
# --dry_run, 40% MFU of 313 TFLOP/s: 28.0 GiB per device of 64, 11.2 s/step, 2,921 tokens/s per device (padding
# counted as tokens). Chat with the result as its 模型推理 does (fastchat.serve.cli), in float16 on one device:
#   python sample.py --ckpt=out/vicuna_7b/export --chat --dtype=float16
#
#   python convert.py apply-delta --src=hf/llama-7b --delta=hf/vicuna-7b-delta-v1.1 --dst=checkpoints/vicuna-7b
#   python prepare.py --input=playground/data/alpaca-data-conversation.json --format=sharegpt --template=vicuna \
#       --tokenizer=checkpoints/vicuna-7b --seq_len=2048 --pack --one_per_row --val_fraction=0.001 \
#       --out=data/alpaca_conversation_vicuna
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
loss_weighting = "micro_batch"  # the 2023 HF Trainer's, to reproduce the run: short replies weigh more
max_iters = 1215  # 3 epochs of 405 steps: 51,950 conversations trained (52,002 less 52 held out) at 128 a step
lr = 2e-5
min_lr = 0.0
warmup_iters = 37  # 3%, rounded up as the HF Trainer does
lr_decay_iters = 1215  # cosine
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
