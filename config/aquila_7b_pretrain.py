# Aquila-7B continued pretraining on 8 Ascend 910B3 NPUs with FlagAI and DeepSpeed (ZeRO-2), fp16 with a static loss
# scale, from the released aquila-7b weights.
# Document: seed 002, "Aquila pretrain for PyTorch" (Ascend ModelZoo FlagAI): 准备环境 (Aquila-pretrain.yaml,
# deepspeed.json, checkpoints_in/aquila-7b/config.json, hostfile slots=8), 准备数据集, 训练结果展示, 推理. It points to
# the port at ModelZoo-PyTorch PyTorch/built-in/foundation/FlagAI; values marked "port" are that code's
# (aquila_pretrain.py: env_type "deepspeed", seq_length 2048, 90 training samples; aquila_model.py).
#
# | value              | document says                          | we use                        | why different
# | devices            | hostfile slots=8; 8p-NPU-910B3         | devices=8, dp=8               |
# | weights            | bmt_pre_load: True (checkpoints_in/    | init_from checkpoints/aquila  |
# |                    | aquila-7b)                             |                               |
# | batch              | yaml batch_size 2, accumulation 1;     | micro 2, global 16 (2 x 8)    | the table's 2 x 8 x
# |                    | table: batch 2, 2.35 s, 13944 tok/s;   |                               | 2048 / 2.35 s = 13944
# |                    | deepspeed.json micro 64 (contradicts)  |                               | fixes it: 16
# | sequence           | config.json max_seq_len 2048, table    | 2048                          |
# | ZeRO               | deepspeed.json stage 2                 | zero_stage=2 (FSDP2)          | FSDP2 shards params
# | fp16 loss scale    | deepspeed.json "loss_scale": 8192      | static_loss_scale=8192        |
# |                    | (non-zero: static in DeepSpeed);       | (window 1000, hysteresis 2,   |
# |                    | window 1000, hysteresis 2, min 1;      | min 1 as given: unused when   |
# |                    | yaml bmt_loss_scale 131072 (BMTrain's) | static)                       |
# | lr                 | yaml lr 3e-4, warm_up 0.01 (BMTrain's  | 1e-6 constant: warmup from    | DeepSpeed's scheduler
# |                    | path); deepspeed.json Adam lr 1e-5 and | 1e-6 to 1e-6 over 2000 steps  | sets the lr from its
# |                    | WarmupLR min 1e-6, max 1e-6, 2000 steps|                               | first step on: 1e-6
# | optimiser          | deepspeed.json Adam (AdamW mode) wd    | the same                      | yaml eps 1e-8 is the
# |                    | 0.1, betas 0.9/0.98, eps 1e-6, clip 1.0|                               | BMTrain path's
# | recompute          | config.json checkpoint_activations,    | full on the first 26 blocks   |
# |                    | ckpoint_layer 26 (port: the first 26)  |                               |
# | init               | config.json initializer_range 0.006    | init_std 0.006, every matrix  |
# |                    | (port: Normal(0, 0.006) every matrix)  | (init_scaled_residual False)  |
# | steps              | yaml epochs 600                        | 3375 = 600 x 90 samples / 16  | port: 90 samples
# | data               | alpaca-data-conversation + Aquila demo | prep below                    | demo data not public
# |                    | data, make_indexed_dataset.sh -> .bin  |                               |
#
# Document's figures: 8 x 910B3, batch 2, seq 2048, 2.35 s/step, 13,944 tokens/s over 8 devices (1,743 per device;
# competitors A1 14,247, A8 13,375). Our --dry_run, 40% MFU of 313 TFLOP/s: 33.1 GiB per device of 64, 1.46 s/step,
# 2,811 tokens/s per device. Generation as its 推理 section (interactive): python sample.py --ckpt=checkpoints/aquila-7b
#
#   python convert.py hf-to-native --src=hf/Aquila-7B --dst=checkpoints/aquila-7b
#   python prepare.py --input=alpaca-data-conversation.json --format=alpaca --template=alpaca --train_on_prompt \
#       --tokenizer=checkpoints/aquila-7b --megatron --out=data/alpaca_conversation_aquila
#   python prepare.py --input=indexed_dataset/data/demo_text_document.bin --format=megatron \
#       --tokenizer=checkpoints/aquila-7b --out=data/alpaca_conversation_aquila      # or: the .bin/.idx it made
#   torchrun --nproc_per_node=8 train.py config/aquila_7b_pretrain.py
#   python train.py config/aquila_7b_pretrain.py --dry_run
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
max_iters = 3375
lr = 1e-6
min_lr = 1e-6
warmup_start_lr = 1e-6
warmup_iters = 2000
lr_decay_iters = 3375
weight_decay = 0.1
beta1, beta2 = 0.9, 0.98
adam_eps = 1e-6
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000  # yaml save_interval
export = True
