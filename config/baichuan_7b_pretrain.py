# Baichuan-7B continued pretraining on 1 node x 8 Ascend NPUs, fp16, from the converted released weights.
# Document: seed 000, "Baichuan for PyTorch" (Ascend): 准备环境, 准备数据集, 准备预训练权重, 开始训练. It names the
# script examples/baichuan/pretrain_baichuan_zero_7B.sh and prints none of its values. In "document says", plain text
# is the document's (its section in brackets); "script:" marks that script's values in Ascend/AscendSpeed at master
# 64b1937 (2023-12-14); "AscendSpeed:" what its ascendspeed/arguments.py defaults to and its ascendspeed/training.py
# and optimizer/__init__.py do at that commit; "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | devices            | 该模型支持单机8卡训练 [开始训练]       | devices=8, dp=8               |
# | precision          | Baichuan基于FP16训练 [准备环境]; --fp16| float16                       |
# |                    | [开始训练]                             |                               |
# | weights            | LOAD_PATH 指向转换后的预训练模型权重   | init_from checkpoints/...     | ours is a checkpoint
# |                    | [开始训练]; convert_weights_from_      | (convert.py hf-to-native; or  | dir; AscendSpeed's
# |                    | huggingface.py [准备预训练权重]        | ascendspeed-to-native)        | ./weight converts
# | data               | alpaca-data-conversation.json,         | the same file (prep below)    |
# |                    | preprocess_data.py [准备数据集]        |                               |
# | split              | --split listed [开始训练]; script:     | --val_fraction=0.05 (every    | Megatron's is by
# |                    | 949,50,1 (documents)                   | 20th record; the 0.1% test    | position; the test
# |                    |                                        | part stays in train)          | split is never read
# | memory             | 每张卡有60G以上空闲内存 [准备环境]     | dry run below                 |
# | ZeRO               | script: DeepSpeed stage 2              | zero_stage=2 (FSDP2)          | FSDP2 shards params
# | fp16 loss scale    | script: DeepSpeed loss_scale 0,        | loss_scale=256 (dynamic),     |
# |                    | initial_scale_power 8, window 1000,    | window 1000, hysteresis 2,    |
# |                    | hysteresis 2, min_loss_scale 1         | min_loss_scale 1              |
# | batch              | script: micro 1, global 8, seq 4096    | the same                      |
# | steps, lr          | script: --train-iters 1024, --lr 1e-5  | the same; warmup 102 steps    |
# |                    | cosine to --min-lr 1e-6, --lr-warmup-  | (102.4: AscendSpeed warms up  |
# |                    | fraction .1 (AscendSpeed: decays over  | over samples)                 |
# |                    | train-iters)                           |                               |
# | optimiser          | AscendSpeed: its AdamW (optimizer/     | AdamW 0.9/0.999, eps 1e-8,    |
# |                    | adam.py) from the Megatron flags, given| weight decay 0.01, clip 1.0   |
# |                    | to deepspeed.initialize(optimizer=...):|                               |
# |                    | lr 1e-5, --weight-decay 1e-2, --clip-  |                               |
# |                    | grad 1.0, --adam-beta1/2 and --adam-eps|                               |
# |                    | unset: 0.9, 0.999, 1e-8. script: its   |                               |
# |                    | DeepSpeed "optimizer" block (AdamW lr  |                               |
# |                    | 2e-5, 0.9/0.95, eps 1e-8, wd 0.0) is   |                               |
# |                    | ignored: DeepSpeed takes the client's  |                               |
# | recompute          | script: --checkpoint-policy block,     | full on the first 30 of 32    |
# |                    | --checkpoint_block_layer 30            | blocks                        |
# | attention          | script: --triangle-attn                | kernels.attention (causal)    | the same function:
# |                    |                                        |                               | its blocks of the
# |                    |                                        |                               | masked triangle skip
# | eval, save, log    | script: eval every 1000 (1 iter), save | the same: the run's end saved |
# |                    | every 10000, log 1                     | (Megatron saves the last too) |
# | loss weighting     | AscendSpeed: each micro batch's mean   | token (the default): every    |
# |                    | over its counted targets, then the     | target counts, so all micro   |
# |                    | mean over micro batches and devices    | batches count alike and the   |
# |                    |                                        | two are the same              |
#
# The document reports no throughput and no loss. Our --dry_run for this mesh (40% MFU of a 910B's 313 TFLOP/s):
# 29.7 GiB per device of 64, 1.53 s/step, 2,671 tokens/s per device.
#
# Data (the document's preprocess_data.py leaves the conversion open; ours: each record in its own alpaca prompt,
# every token counted as in pretraining, each ending with eos), or the Megatron .bin/.idx its preprocess_data.py
# wrote, as they are (prepare.py adds an eos to a record that has none):
#   python convert.py hf-to-native --src=hf/Baichuan-7B --dst=checkpoints/baichuan-7b
#   python prepare.py --input=alpaca-data-conversation.json --format=alpaca --template=alpaca --train_on_prompt \
#       --tokenizer=checkpoints/baichuan-7b --val_fraction=0.05 --megatron --out=data/alpaca_conversation_baichuan
#   python prepare.py --input=dataset/alpaca_text_document.bin --format=megatron --tokenizer=checkpoints/baichuan-7b \
#       --val_fraction=0.05 --out=data/alpaca_conversation_baichuan      # or: Megatron's own files
#   torchrun --nproc_per_node=8 train.py config/baichuan_7b_pretrain.py
#   python train.py config/baichuan_7b_pretrain.py --dry_run
# A run started in AscendSpeed moves here and back (its ./weight or a --save dir; tp 1 for this script):
#   python convert.py ascendspeed-to-native --src=ckpt --like=checkpoints/baichuan-7b --dst=checkpoints/baichuan-7b-run
#   python convert.py native-to-ascendspeed --src=out/baichuan_7b_pretrain/export --dst=weight --deepspeed
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
loss_weighting = "token"  # every target counts: the script's per-micro-batch mean too
max_iters = 1024
lr = 1e-5
min_lr = 1e-6
warmup_iters = 102  # 10% of 1024
lr_decay_iters = 1024
weight_decay = 0.01
beta1, beta2 = 0.9, 0.999  # AscendSpeed's AdamW: --adam-beta2 unset (the DeepSpeed block's 0.95 is not used)
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 1
log_interval = 1
ckpt_interval = 10_000  # --save-interval: only the end of the run
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
