# LLaMA-13B supervised fine-tuning on the Alpaca data (alpaca_data.json), 5 epochs, bf16, FSDP full_shard; the mesh
# and the rest are the LLaMA-7B command's (1 node x 4 A100 80GB), as the source gives none for 13B.
# Not a run of the five documents this project reproduces (see docs/recipes.md): a further published setup.
# Source: tatsu-lab/stanford_alpaca at 761dc5b (2023-05-29): README.md "Fine-tuning", its hyperparameter table's
# LLaMA-13B column (batch 128, lr 1e-5, 5 epochs, max length 512, weight decay 0); its only command is for LLaMA-7B
# (config/llama_7b_alpaca.py): what we take from it is marked "our choice (7B's)". train.py as for 7B.
#
# | value              | source says                            | we use                        | why different
# | batch              | 128                                    | micro 4 x 4 devices x 8 accum | our choice (7B's)
# | lr                 | 1e-5                                   | 1e-5, cosine, 61 warmup steps | our choice (7B's 3%)
# | epochs             | 5                                      | 2032 steps = 5 x 52,002 / 128 |
# | max length         | 512                                    | rows of 512, one example each |
# | weight decay       | 0                                      | 0 (AdamW 0.9/0.999, eps 1e-8, | our choice (7B's HF)
# |                    |                                        | clip 1.0)                     |
# | devices, sharding  | not given for 13B                      | 4 x A100 80GB, FSDP full_shard| our choice (7B's)
# |                    |                                        | (zero_stage=3), bf16          |
# | recompute          | not given (7B: none)                   | none: fits without            | our choice (7B's)
# | weights, data,     | LLaMA-13B; alpaca_data.json, train.py's| as llama_7b_alpaca (its       | as for 7B
# | prompt, loss       | prompt and loss                        | differences apply)            |
# | loss weighting     | the 7B's (HF): each micro batch's mean | micro_batch: the same         | as for 7B
# |                    | over its counted targets, then the     |                               |
# |                    | mean over micro batches and devices    |                               |
#
# The source reports no throughput and no loss. Our --dry_run (4 x 80 GB, 40% MFU of 312 TFLOP/s): 64.6 GiB per
# device, 10.3 s/step, 1,592 tokens/s per device, padding counted as tokens.
#
#   python convert.py hf-to-native --src=hf/llama-13b --dst=checkpoints/llama-13b
#   python prepare.py --input=alpaca_data.json --format=alpaca --template=alpaca --tokenizer=checkpoints/llama-13b \
#       --seq_len=512 --pack --one_per_row --val_fraction=0.002 --out=data/alpaca_llama
#   torchrun --nproc_per_node=4 train.py config/llama_13b_alpaca.py
#   python train.py config/llama_13b_alpaca.py --dry_run
out_dir = "out/llama_13b_alpaca"
data_dir = "data/alpaca_llama"
init_from = "checkpoints/llama-13b"
model = "llama-13b"
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
max_iters = 2032
lr = 1e-5
min_lr = 0.0
warmup_iters = 61  # 3%, rounded up as HF does
lr_decay_iters = 2032  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 2000
keep_last = 2  # as llama_7b_alpaca (our choice; the source's limit is 1)
export = True
