# LLaMA-7B supervised fine-tuning on the Alpaca data (alpaca_data.json) on 1 node x 4 A100 80GB, bf16, FSDP
# full_shard, 3 epochs.
# Not a run of the five documents this project reproduces (see docs/recipes.md): a further published setup.
# Source: tatsu-lab/stanford_alpaca at 761dc5b (2023-05-29): README.md "Fine-tuning" (the hyperparameter table and
# the torchrun command for LLaMA-7B on 4 A100 80G GPUs) and train.py (PROMPT_DICT, the loss, the padding). Values
# marked "HF" are the Hugging Face Trainer's defaults, which the command leaves as they are.
#
# | value              | source says                            | we use                        | why different
# | devices            | torchrun --nproc_per_node=4, 4 A100 80G| devices=4, dp=4, 80 GiB,      |
# |                    |                                        | 312 TFLOP/s (A100 bf16)       |
# | sharding           | --fsdp "full_shard auto_wrap" per      | zero_stage=3: FSDP2 per block,|
# |                    | LlamaDecoderLayer                      | resharded after forward       |
# | precision          | --bf16 True, --tf32 True               | bfloat16                      | no tf32 switch here
# | weights            | LLaMA-7B converted to Hugging Face     | init_from checkpoints/...     |
# | data               | alpaca_data.json (52K examples; 52,002 | the same file                 |
# |                    | records)                               |                               |
# | prompt, loss       | train.py PROMPT_DICT (with and without | prepare.py alpaca: the same   | the template's, which
# |                    | input), bos first, the output + eos    | prompts and loss, the reply on| sample.py --chat uses
# |                    | right after "### Response:"; loss on   | the line after "### Response:"| too: not a recipe's
# |                    | the output and eos                     |                               |
# | length, padding    | model_max_length 512 (cut there); each | one example per row of 512,   | padding is masked
# |                    | batch padded to its longest with an    | padding masked; vocabulary    | either way
# |                    | added [PAD] token (32,001 rows)        | unchanged                     |
# | batch              | per device 4, accumulation 8 = 128     | the same                      |
# | epochs             | 3                                      | 1219 steps = 3 x 52,002 / 128 |
# | lr                 | 2e-5, cosine, --warmup_ratio 0.03      | the same: 37 warmup steps,    |
# |                    | (HF: from 0, down to 0)                | cosine to 0                   |
# | optimiser          | adamw_torch, --weight_decay 0.; HF:    | the same                      |
# |                    | 0.9/0.999, eps 1e-8, clip 1.0          |                               |
# | recompute          | none (no --gradient_checkpointing)     | none                          |
# | eval               | --evaluation_strategy "no"             | 0.2% held out, every 200 steps| train.py evaluates:
# |                    |                                        |                               | our choice
# | save, log          | --save_steps 2000, --save_total_limit  | ckpt_interval 2000 (the last  | keep_last: our choice,
# |                    | 1; --logging_steps 1                   | step), keep_last 2; log 1     | a damaged newest step
# |                    |                                        |                               | dir falls back
# | loss weighting     | HF: each micro batch's mean over its   | micro_batch: the same         |
# |                    | counted targets, then the mean over    |                               |
# |                    | micro batches and devices              |                               |
#
# The source reports no throughput and no loss. Our --dry_run (4 x 80 GB, 40% MFU of 312 TFLOP/s): 35.6 GiB per
# device, 5.31 s/step, 3,085 tokens/s per device, padding counted as tokens.
#
#   python convert.py hf-to-native --src=hf/llama-7b --dst=checkpoints/llama-7b
#   python prepare.py --input=alpaca_data.json --format=alpaca --template=alpaca --tokenizer=checkpoints/llama-7b \
#       --seq_len=512 --pack --one_per_row --val_fraction=0.002 --out=data/alpaca_llama
#   torchrun --nproc_per_node=4 train.py config/llama_7b_alpaca.py
#   python train.py config/llama_7b_alpaca.py --dry_run
out_dir = "out/llama_7b_alpaca"
data_dir = "data/alpaca_llama"
init_from = "checkpoints/llama-7b"
model = "llama-7b"
devices = 4
dp, tp = 4, 1
zero_stage = 3
device_memory_gib = 80.0  # A100 80GB
peak_flops = 312e12  # A100 dense bf16
activation_checkpointing = "none"
dtype = "bfloat16"
seq_len = 512
micro_batch_size = 4
global_batch_size = 128
loss_weighting = "micro_batch"  # the 2023 HF Trainer's, to reproduce the run: short replies weigh more
max_iters = 1219
lr = 2e-5
min_lr = 0.0
warmup_iters = 37  # 3%, rounded up as HF does
lr_decay_iters = 1219  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 2000
keep_last = 2  # the source's save_total_limit is 1: see the table
export = True
