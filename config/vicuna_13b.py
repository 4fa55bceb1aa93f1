# Vicuna-13B: LLaMA-13B fine-tuned on ShareGPT conversations on 8 x A100 80GB, bf16, FSDP, gradient checkpointing.
# Source: lm-sys/FastChat hyperparameter table (Vicuna-13B: batch 128, lr 2e-5, 3 epochs, max length 2048, wd 0) and
# scripts/train_vicuna_13b.sh (8 GPUs, 4 per device x 4 accumulation, warmup 3%, cosine, FSDP full_shard,
# gradient checkpointing); template vicuna_v1.1.
#   python convert.py hf-to-native --src=hf/llama-13b --dst=checkpoints/llama-13b
#   python prepare.py --input=sharegpt_clean_split.json --format=sharegpt --template=vicuna \
#       --tokenizer=checkpoints/llama-13b --seq_len=2048 --pack --out=data/sharegpt_llama
#   torchrun --nproc_per_node=8 train.py config/vicuna_13b.py
#   python train.py config/vicuna_13b.py --dry_run
out_dir = "out/vicuna_13b"
data_dir = "data/sharegpt_llama"
init_from = "checkpoints/llama-13b"
model = "llama-13b"
devices = 8
dp, tp = 8, 1
device_memory_gib = 80.0
peak_flops = 312e12
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 2048
micro_batch_size = 4
global_batch_size = 128
max_iters = 1641  # 3 epochs of ~70K conversations at 128 a step; packed rows can hold several (see --dry_run)
lr = 2e-5
min_lr = 0.0
warmup_iters = 49
lr_decay_iters = 1641
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
eval_interval = 200
eval_iters = 10
log_interval = 1
ckpt_interval = 400
export = True
