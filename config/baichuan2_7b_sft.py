# Baichuan2-7B multi-turn supervised fine-tuning on one node of 8 devices, bf16, ZeRO-3, gradient checkpointing, on
# the 10k BELLE conversations Baichuan2 ships.
# Not a run of the five documents this project reproduces (see docs/recipes.md): a further published setup.
# Source: baichuan-inc/Baichuan2, README.md "模型微调" / "单机训练" (the deepspeed fine-tune.py command),
# fine-tune/fine-tune.py and fine-tune/ds_config.json, all three as in its first commit d796a65 (2023-09-06) and
# unchanged up to ed1cf0f (2024-02-26). Values marked "HF" are the Hugging Face Trainer's defaults, which the command
# leaves as they are.
#
# | value              | source says                            | we use                        | why different
# | devices            | hostfile="" (one machine, all its      | devices=8, dp=8 (the multi-   | count not given:
# |                    | devices; the count is not given)       | node hostfile's slots=8)      | our choice
# | ZeRO               | ds_config.json stage 3, overlap_comm   | zero_stage=3 (FSDP2)          | FSDP2 for DeepSpeed
# | precision          | --bf16 True, --tf32 True               | bfloat16                      | no tf32 switch here
# | weights            | baichuan-inc/Baichuan2-7B-Base         | init_from checkpoints/...     |
# | data               | data/belle_chat_ramdon_10k.json (1万条 | the same file, one            |
# |                    | = 10k from BELLE multiturn_chat_0.8M); | conversation per row padded to|
# |                    | each padded to model_max_length 512    | 512, padding masked           |
# | template, loss     | fine-tune.py: 195 + user, 196 + reply; | prepare.py baichuan2: the same| our targets are the
# |                    | loss on each reply and an eos label    | targets; that eos is also an  | next input tokens
# |                    | after it (eos in the input only last)  | input token after each reply  |
# | too long           | cut at 512 tokens                      | trailing exchanges dropped    | prepare.py's rule: no
# |                    |                                        | first                         | reply cut if avoidable
# | batch              | per device 16, accumulation 1          | micro 16, global 128 (x 8)    |
# | epochs             | 4                                      | 313 steps = 4 x 10,000 / 128  |
# | lr                 | 2e-5, --lr_scheduler_type constant,    | the same                      |
# |                    | --warmup_ratio 0.0                     |                               |
# | optimiser          | adamw_torch (fine-tune.py); 0.9/0.98,  | the same                      |
# |                    | eps 1e-8, wd 1e-4, clip 1.0            |                               |
# | recompute          | --gradient_checkpointing True          | full                          |
# | eval               | none (HF: evaluation_strategy no)      | 1% of the conversations held  | train.py evaluates:
# |                    |                                        | out, every 100 steps          | our choice
# | save, log          | --save_strategy epoch, logging 1       | every 78 steps (~an epoch), 1 |
# | loss weighting     | HF: each micro batch's mean over its   | micro_batch: the same         |
# |                    | counted targets, then the mean over    |                               |
# |                    | micro batches and devices              |                               |
#
# The source reports no throughput and no loss and names no device. Our --dry_run (8 x 64 GB, 40% MFU of 313
# TFLOP/s, a 910B's): 23.9 GiB per device, 2.80 s/step, 2,929 tokens/s per device, padding counted as tokens.
#
#   python convert.py hf-to-native --src=hf/Baichuan2-7B-Base --dst=checkpoints/baichuan2-7b-base
#   python prepare.py --input=fine-tune/data/belle_chat_ramdon_10k.json --format=sharegpt --template=baichuan2 \
#       --tokenizer=checkpoints/baichuan2-7b-base --seq_len=512 --pack --one_per_row --val_fraction=0.01 \
#       --out=data/baichuan2_sft
#   torchrun --nproc_per_node=8 train.py config/baichuan2_7b_sft.py
#   python train.py config/baichuan2_7b_sft.py --dry_run
out_dir = "out/baichuan2_7b_sft"
data_dir = "data/baichuan2_sft"
init_from = "checkpoints/baichuan2-7b-base"  # raw NormHead rows (norm_head=true): normalised in every forward
model = "baichuan2-7b"
devices = 8
dp, tp = 8, 1
zero_stage = 3
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 512
micro_batch_size = 16
global_batch_size = 128
loss_weighting = "micro_batch"  # the 2023 HF Trainer's, to reproduce the run: short replies weigh more
max_iters = 313
lr = 2e-5
min_lr = 2e-5  # constant
warmup_iters = 0
lr_decay_iters = 313
weight_decay = 1e-4
beta1, beta2 = 0.9, 0.98
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 100
eval_iters = 10
log_interval = 1
ckpt_interval = 78
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
