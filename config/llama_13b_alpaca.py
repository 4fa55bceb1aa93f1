# Not a run of the five documents this project reproduces (see README "Recipes"): a further published setup, its
# values from the source it names.
# LLaMA-13B supervised fine-tuning on the Alpaca data on 4 x A100 80GB, bf16, FSDP, gradient checkpointing.
# Source: tatsu-lab/stanford_alpaca README, fine-tuning table (LLaMA-13B: batch 128, lr 1e-5, 5 epochs, max length
# 512, weight decay 0) and its torchrun/FSDP command (4 x A100 80GB, warmup 3%, cosine); template 'alpaca'.
#   python convert.py hf-to-native --src=hf/llama-13b --dst=checkpoints/llama-13b
#   python prepare.py --input=alpaca_data.json --format=alpaca --template=alpaca --tokenizer=checkpoints/llama-13b \
#       --seq_len=512 --pack --out=data/alpaca_llama
#   torchrun --nproc_per_node=4 train.py config/llama_13b_alpaca.py
#   python train.py config/llama_13b_alpaca.py --dry_run
out_dir = "out/llama_13b_alpaca"
data_dir = "data/alpaca_llama"
init_from = "checkpoints/llama-13b"
model = "llama-13b"
devices = 4
dp, tp = 4, 1
device_memory_gib = 80.0
peak_flops = 312e12
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 512
micro_batch_size = 4
global_batch_size = 128
max_iters = 2032  # 5 epochs of 52,002 examples at 128 a step; packed rows hold several (see --dry_run)
lr = 1e-5
min_lr = 0.0
warmup_iters = 61  # 3%
lr_decay_iters = 2032
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
export = True
