# Aquila-7B continued pretraining on 8 Ascend 910B3 NPUs with FlagAI and DeepSpeed (ZeRO-2), fp16 with a static loss
# scale, from FlagAI's released aquila-7b weights.
# Document: seed 002, "Aquila pretrain for PyTorch" (Ascend ModelZoo FlagAI): 准备环境 (Aquila-pretrain.yaml,
# deepspeed.json, checkpoints_in/aquila-7b/config.json, hostfile slots=8), 准备数据集, 训练结果展示, 推理. In "document
# says", plain text is the document's (its section in brackets); "port:" marks the code of the port it points to
# (Ascend/ModelZoo-PyTorch PyTorch/built-in/foundation/FlagAI, examples/Aquila/Aquila-pretrain/aquila_pretrain.py:
# env_type "deepspeed", seq_length 2048); "FlagAI:" FlagAI at the commit it names, 0b487694 (the model, the data set
# and trainer code the port keeps: support/flagai.py says which files); "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | devices            | hostfile slots=8 [准备环境]; 8p-NPU-   | devices=8, dp=8               |
# |                    | 910B3 [训练结果展示]                   |                               |
# | weights            | checkpoints_in/aquila-7b/ (config.json | init_from checkpoints/aquila- |
# |                    | + weights from model.baai.ac.cn),      | 7b: convert.py hf-to-native   |
# |                    | bmt_pre_load: True [准备环境]; FlagAI: | reads that dir (FlagAI's      |
# |                    | pytorch_model.bin, Meta's names        | format, rotary rows permuted) |
# | batch              | yaml batch_size 2, accumulation 1;     | micro 2, global 16 (2 x 8)    | ours: the table's
# |                    | table: batch_size 2, 2.35 s, 13944     |                               | 2 x 8 x 2048 / 2.35 s
# |                    | tokens/s [训练结果展示]; deepspeed.json|                               | = 13944 fixes it: 16
# |                    | micro 64 (contradicts) [准备环境]      |                               |
# | sequence           | config.json max_seq_len 2048; table    | 2048                          | FlagAI's window is
# |                    | seq_len 2048; port: seq_length 2048    |                               | 2049 tokens cut to
# |                    |                                        |                               | 2048: 2047 targets
# | ZeRO               | deepspeed.json stage 2 [准备环境]      | zero_stage=2 (FSDP2)          | FSDP2 shards params
# | fp16 loss scale    | deepspeed.json "loss_scale": 8192,     | static_loss_scale=8192        |
# |                    | window 1000, hysteresis 2, min 1; yaml | (window 1000, hysteresis 2,   |
# |                    | bmt_loss_scale 131072 [准备环境]; ours:| min 1 as given: unused when   |
# |                    | a non-zero loss_scale is static in     | static)                       |
# |                    | DeepSpeed, bmt_ is BMTrain's           |                               |
# | lr                 | yaml lr 3.0e-4, warm_up 0.01;          | 1e-6 constant: warmup from    | ours: DeepSpeed's
# |                    | deepspeed.json Adam lr 1e-5 and        | 1e-6 to 1e-6 over 2000 steps  | scheduler sets the lr
# |                    | WarmupLR min 1e-6, max 1e-6, 2000 steps|                               | from its first step:
# |                    | [准备环境]                             |                               | 1e-6; yaml's: BMTrain
# | optimiser          | deepspeed.json Adam wd 0.1, betas      | AdamW 0.9/0.98, eps 1e-6,     | ours: yaml eps 1e-8
# |                    | 0.9/0.98, eps 1e-6, gradient_clipping  | wd 0.1, clip 1.0              | is the BMTrain path's
# |                    | 1.0; yaml eps 1.e-8 [准备环境]         |                               |
# | recompute          | config.json checkpoint_activations,    | full on the first 26 blocks   |
# |                    | ckpoint_layer 26 [准备环境]; port: the |                               |
# |                    | first 26 blocks                        |                               |
# | attention          | config.json use_triangle_attn true,    | kernels.attention: causal     | the same function:
# |                    | flash_atten false [准备环境]; FlagAI:  | softmax(q k^T / sqrt d), the  | the port's triangle
# |                    | scores clamped to [-1024, 1024]        | NPU's fused op; no clamp      | kernel skips masked
# |                    |                                        |                               | blocks; the clamp
# |                    |                                        |                               | acts only on scores
# |                    |                                        |                               | past 1024 (fp16 guard)
# | init               | config.json initializer_range 0.006    | init_std 0.006, every matrix  | (unused: the run
# |                    | [准备环境]; FlagAI: Normal(0, 0.006)   | (init_scaled_residual False)  | starts from weights)
# | data               | alpaca-data-conversation + aquila demo | the same two, prep below      |
# |                    | data, make_indexed_dataset.sh -> .bin  |                               |
# |                    | /.idx in ../../indexed_dataset/data/   |                               |
# |                    | [准备数据集]; FlagAI: the demo is      |                               |
# |                    | examples/indexed_dataset/data/         |                               |
# |                    | demo.jsonl (its demo_text_document.bin |                               |
# |                    | holds GPT-2 ids, not Aquila's)         |                               |
# | split              | port: splits_string '90,10' (the first | --val_fraction=0.1 (every     | evenly spread; the
# |                    | 90% of documents train; valid unused)  | 10th document)                | same share
# | steps              | yaml epochs 600 [准备环境]; FlagAI:    | 600 x steps_per_epoch(        | max_iters from the
# |                    | len(GPTDataset) = every 2048-token     | gpt_dataset_len(train tokens, | prepared data's
# |                    | window of the train documents (the     | 2048, 90), 2, 8): from        | meta.json (estimate
# |                    | [90, 10] num_samples are a floor);     | meta.json's train_tokens      | below without it)
# |                    | EnvTrainer: 8 ranks x batch 2, drop_   |                               |
# |                    | last                                   |                               |
# | eval               | port: valid_dataset=None (none)        | every 1000 steps, 10 batches  | ours: train.py
# |                    |                                        |                               | evaluates
# | loss weighting     | FlagAI: each micro batch's mean over   | token (the default): every    |
# |                    | its counted targets, then the mean     | target counts, so all micro   |
# |                    | over micro batches and devices         | batches count alike and the   |
# |                    |                                        | two are the same              |
#
# Document's figures [训练结果展示]: 8 x 910B3, batch 2, seq 2048, 2.35 s/step, 13,944 tokens/s over 8 devices (1,743
# per device; competitors A1 14,247, A8 13,375). Our --dry_run, 40% MFU of 313 TFLOP/s: 33.1 GiB per device of 64,
# 1.46 s/step, 2,811 tokens/s per device. Generation as its 推理 section (interactive): python sample.py
# --ckpt=checkpoints/aquila-7b --chat. Steps: 600 epochs of the train windows at 16 a step. Before the data is
# prepared the count uses ours: an estimate of 7.2M Aquila tokens in the two sources (52,002 alpaca records at ~138
# tokens with their prompt, the demo's 20 documents ~20K), 90% train: 6.48M tokens, 3,164 windows, 198 steps an epoch,
# 118,800 steps (at 2.35 s: 78 hours). The old count here, 3,375 = 600 x 90 / 16, took the requested num_samples for
# the data set's length.
#
# Weights: FlagAI's dir as its AutoLoader lays it out (config.json with dim/n_heads/..., pytorch_model.bin); it ships
# its BPE as vocab.json + merges.txt: put the Hugging Face release's tokenizer.json and tokenizer_config.json (the same
# BPE and its special tokens) beside them first, or convert.py warns that the output has no tokenizer.
# Data: the conversations in their alpaca prompt and FlagAI's demo text, each tokenized with Aquila's BPE (as
# make_indexed_dataset.sh does), then merged into one data dir:
#   python convert.py hf-to-native --src=checkpoints_in/aquila-7b --dst=checkpoints/aquila-7b
#   python prepare.py --input=alpaca-data-conversation.json --format=alpaca --template=alpaca --train_on_prompt \
#       --tokenizer=checkpoints/aquila-7b --val_fraction=0 --megatron --out=data/aquila_part_alpaca
#   python prepare.py --input=FlagAI/examples/indexed_dataset/data/demo.jsonl --format=json --text_field=text \
#       --tokenizer=checkpoints/aquila-7b --val_fraction=0 --megatron --out=data/aquila_part_demo
#   python prepare.py --input data/aquila_part_alpaca/train.bin data/aquila_part_demo/train.bin --format=megatron \
#       --tokenizer=checkpoints/aquila-7b --val_fraction=0.1 --out=data/alpaca_conversation_aquila
#   torchrun --nproc_per_node=8 train.py config/aquila_7b_pretrain.py
#   python train.py config/aquila_7b_pretrain.py --dry_run
import json as _json
from pathlib import Path as _Path

from support import flagai as _flagai

out_dir = "out/aquila_7b_pretrain"
data_dir = "data/alpaca_conversation_aquila"
init_from = "checkpoints/aquila-7b"
model = "aquila-7b"
init_std = 0.006
init_scaled_residual = False
devices = 8
dp, tp = 8, 1
zero_stage = 2
activation_checkpointing = "full"
activation_checkpointing_layers = 26
dtype = "float16"
static_loss_scale = 8192.0
loss_scale_window = 1000
loss_scale_hysteresis = 2
min_loss_scale = 1.0
seq_len = 2048
micro_batch_size = 2
global_batch_size = 16
loss_weighting = "token"  # every target counts: FlagAI's per-micro-batch mean too
_meta = _Path(data_dir) / "meta.json"
_train_tokens = _json.loads(_meta.read_text())["train_tokens"] if _meta.exists() else 6_480_000  # ours: an estimate
max_iters = 600 * _flagai.steps_per_epoch(_flagai.gpt_dataset_len(_train_tokens, 2048, 90), 2, 8)  # yaml epochs 600
lr = 1e-6
min_lr = 1e-6
warmup_start_lr = 1e-6
warmup_iters = 2000
lr_decay_iters = max_iters
weight_decay = 0.1
beta1, beta2 = 0.9, 0.98
adam_eps = 1e-6
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000  # yaml save_interval
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
